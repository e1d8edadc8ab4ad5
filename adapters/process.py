"""A started program's life: feed its input, capture its output, wait, stop its group.

The program was started in a session and process group of its own (its group id is its
PID). Its exit code is known as soon as it exits, even when something it left running
still holds the pipes; whatever it left running in the group is then stopped: SIGTERM,
a grace period, SIGKILL. A process that left the group (``setsid``) cannot hold the
step open: the pipes are let go when the group is stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import suppress
from typing import Any

import psutil

KILL_GRACE_S = 1.0
_BACKGROUND: set[asyncio.Task[None]] = set()


async def communicate(proc: asyncio.subprocess.Process, stdin: bytes | None, cap: int
                      ) -> tuple[tuple[bytes, bool], tuple[bytes, bool], int]:
    """Feed ``stdin``, keep at most ``cap`` bytes of stdout and of stderr each (and
    whether more came), wait for the exit code; stop the whole group if interrupted."""
    assert proc.stdout is not None and proc.stderr is not None
    readers = [asyncio.ensure_future(_drain(proc.stdout, cap)),
               asyncio.ensure_future(_drain(proc.stderr, cap))]
    tasks: list[asyncio.Future[Any]] = list(readers)
    if stdin is not None:
        tasks.append(asyncio.ensure_future(_feed(proc, stdin)))
    try:
        code = await _exit_code(proc)
        if _live_members(proc.pid):
            await _terminate(proc)  # what it left running would hold the pipes, or leak
        await asyncio.wait(tasks)  # unlike gather, a cancel here leaves them to _stop
        await proc.wait()
        out, err = (reader.result() for reader in readers)
        return out, err, code
    except BaseException:
        # Shielded, so that a second cancel cannot leave the group running.
        stopping = asyncio.ensure_future(stop(proc, tasks))
        _BACKGROUND.add(stopping)
        stopping.add_done_callback(_BACKGROUND.discard)
        await asyncio.shield(stopping)
        raise


async def _exit_code(proc: asyncio.subprocess.Process) -> int:
    """The program's exit code as soon as it exits.

    ``proc.wait()`` also waits for the pipes to close, which a process left running in
    the background keeps open; so its return code is also polled.
    """
    waiting = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None:
            await asyncio.wait({waiting}, timeout=0.05)
        return proc.returncode
    finally:
        waiting.cancel()


async def _drain(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(64 * 1024):
        room = cap - len(kept)
        kept += chunk[:max(room, 0)]
        truncated = truncated or len(chunk) > room
    return bytes(kept), truncated


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program exited without reading all of its input
    finally:
        proc.stdin.close()


async def stop(proc: asyncio.subprocess.Process, tasks: list[asyncio.Future[Any]]) -> None:
    """Kill the group, let the pipes drain to EOF, reap the program."""
    await _terminate(proc)
    # asyncio.wait refuses an empty set: a program stopped while starting has no readers yet.
    _, pending = await asyncio.wait(tasks, timeout=KILL_GRACE_S) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    with suppress(TimeoutError):
        await asyncio.wait_for(_exit_code(proc), KILL_GRACE_S)
    transport = getattr(proc, "_transport", None)
    if transport is not None and not transport.is_closing():
        # A process that left the group (setsid) may still hold the pipes, and a program
        # stopped while starting was never read from: stop listening, and reap it (close
        # polls the process), so nothing is left for the garbage collector to warn about.
        transport.close()  # kills a direct child still alive after the grace
        await asyncio.sleep(0)  # the pipes close in a callback of the next loop pass
    if proc.returncode is None:  # killed but not yet reaped (a loaded machine): reap it
        with suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, wait up to KILL_GRACE_S, then SIGKILL what is left."""
    group = proc.pid
    _signal_group(group, signal.SIGTERM)
    if not await _wait_group_gone(group, KILL_GRACE_S):
        _signal_group(group, signal.SIGKILL)
        await _wait_group_gone(group, KILL_GRACE_S)


async def _wait_group_gone(group: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _live_members(group):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _live_members(group: int) -> list[int]:
    """PIDs of the group's processes that are not zombies (an orphan's zombie may stay
    until init reaps it, and cannot be killed anyway)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == group:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members
