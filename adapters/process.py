"""A started program's life: feed its input, capture its output, wait, stop its group.

A program is started with ``spawn`` (``os.posix_spawn``: no Python code runs in the
child), in a session and process group of its own (its group id is its PID), and watched
on the event loop through a pidfd and its pipes, with no task and no thread of asyncio's
child watcher. So starting one cannot be interrupted half-way: asyncio's own
``create_subprocess_exec``, cancelled while it connects the pipes (as a loop shutting
down cancels every task), waits for them forever.

Its exit code is known as soon as it exits, even when something it left running still
holds the pipes; whatever it left running in the group is then stopped: SIGTERM, a grace
period, SIGKILL. A process that left the group (``setsid``) cannot hold the step open:
the pipes are let go when the group is stopped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import psutil

KILL_GRACE_S = 1.0
_BACKGROUND: set[asyncio.Task[None]] = set()


class Child:
    """A program started by ``spawn``: its PID, our ends of its pipes (non-blocking;
    ``stdin`` None when it was given none), and its exit code once it has exited and been
    reaped (as ``subprocess``: ``-N`` for signal N)."""

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited: asyncio.Future[None] | None = None

    async def wait(self) -> int:
        """The exit code, once the program has exited (its pipes may still be held)."""
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            if self._exited is None:
                self._exited = loop.create_future()
                loop.add_reader(self._pidfd, self._reap, loop)
            await asyncio.shield(self._exited)
        assert self.returncode is not None
        return self.returncode

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else: its code is lost
            self.returncode = 255
        os.close(self._pidfd)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    def kill(self) -> None:
        if self.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def let_go(self) -> None:
        """Close our ends of its pipes, none of them read (its stdin if still open)."""
        self.close_stdin()
        for fd in (self.stdout, self.stderr):
            with suppress(OSError):
                os.close(fd)


def spawn(argv: Sequence[str], env: dict[str, str], extra_fds: Sequence[int] = ()) -> Child:
    """Start ``argv`` (``argv[0]`` a path) in a new session, in planrun's working
    directory, with pipes for its stdin, stdout and stderr; ``extra_fds`` become its
    descriptors 3, 4, … . Signals Python ignores (SIGPIPE, SIGXFSZ) are reset to their
    defaults, as ``subprocess`` does."""
    low = 3 + len(extra_fds)  # the descriptors the pipes and extra_fds are moved to
    stdin, stdout, stderr = _pipe(low), _pipe(low), _pipe(low)  # (read end, write end)
    lifted = [_high(fd, low, copy=True) for fd in extra_fds]
    theirs = [stdin[0], stdout[1], stderr[1]]
    try:
        moves = [(os.POSIX_SPAWN_DUP2, fd, to) for to, fd in enumerate([*theirs, *lifted])]
        pid = os.posix_spawn(argv[0], list(argv), env, file_actions=moves, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    except BaseException:
        for fd in (stdin[1], stdout[0], stderr[0]):
            os.close(fd)
        raise
    finally:
        copies = [copy for copy, fd in zip(lifted, extra_fds, strict=True) if copy != fd]
        for fd in theirs + copies:
            os.close(fd)
    for fd in (stdin[1], stdout[0], stderr[0]):
        os.set_blocking(fd, False)
    return Child(pid, stdin[1], stdout[0], stderr[0])


def _pipe(low: int) -> tuple[int, int]:
    read, write = os.pipe()
    return _high(read, low), _high(write, low)


def _high(fd: int, low: int, copy: bool = False) -> int:
    """``fd``, or a copy of it at ``low`` or above, out of the way of the descriptors
    ``spawn`` moves pipes to (planrun may have been started with some of 0–2 closed, and a
    pipe would take their place), the original closed unless ``copy``."""
    if fd >= low:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    if not copy:
        os.close(fd)
    return moved


async def communicate(proc: Child, stdin: bytes | None, cap: int
                      ) -> tuple[tuple[bytes, bool], tuple[bytes, bool], int]:
    """Feed ``stdin``, keep at most ``cap`` bytes of stdout and of stderr each (and
    whether more came), wait for the exit code; stop the whole group if interrupted."""
    readers = [asyncio.ensure_future(_drain(proc.stdout, cap)),
               asyncio.ensure_future(_drain(proc.stderr, cap))]
    tasks: list[asyncio.Future[Any]] = list(readers)
    if stdin is not None and proc.stdin is not None:
        tasks.append(asyncio.ensure_future(_feed(proc, stdin)))
    else:
        proc.close_stdin()
    try:
        code = await proc.wait()
        if _live_members(proc.pid):
            await _terminate(proc)  # what it left running would hold the pipes, or leak
        await asyncio.wait(tasks)  # unlike gather, a cancel here leaves them to stop
        out, err = (reader.result() for reader in readers)
        return out, err, code
    except BaseException:
        # Shielded, so that a second cancel cannot leave the group running.
        stopping = asyncio.ensure_future(stop(proc, tasks))
        _BACKGROUND.add(stopping)
        stopping.add_done_callback(_BACKGROUND.discard)
        await asyncio.shield(stopping)
        raise


async def _ready(fd: int, writing: bool = False) -> None:
    """Until ``fd`` can be read (or written) without blocking."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writing else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writing else loop.remove_reader)(fd)


async def _drain(fd: int, cap: int) -> tuple[bytes, bool]:
    """Read ``fd`` to its end (then close it), keeping at most ``cap`` bytes."""
    kept = bytearray()
    truncated = False
    try:
        while True:
            try:
                chunk = os.read(fd, 64 * 1024)
            except BlockingIOError:
                await _ready(fd)
                continue
            if not chunk:
                return bytes(kept), truncated
            room = cap - len(kept)
            kept += chunk[:max(room, 0)]
            truncated = truncated or len(chunk) > room
    finally:
        os.close(fd)


async def _feed(proc: Child, data: bytes) -> None:
    assert proc.stdin is not None
    unsent = memoryview(data)
    try:
        while unsent:
            try:
                unsent = unsent[os.write(proc.stdin, unsent):]
            except BlockingIOError:
                await _ready(proc.stdin, writing=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program exited without reading all of its input
    finally:
        proc.close_stdin()


async def stop(proc: Child, tasks: list[asyncio.Future[Any]]) -> None:
    """Kill the group, let the pipes drain to EOF (or stop reading them: a process that
    left the group may hold them), reap the program."""
    await _terminate(proc)
    # asyncio.wait refuses an empty set: a program stopped while starting has no readers yet.
    _, pending = await asyncio.wait(tasks, timeout=KILL_GRACE_S) if tasks else (set(), set())
    for task in pending:
        task.cancel()  # closes its end of the pipe
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except TimeoutError:  # it ignored SIGTERM and left the group: kill it, then reap it
        proc.kill()
        await proc.wait()
    if not tasks:  # nobody read them
        proc.let_go()


async def _terminate(proc: Child) -> None:
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
