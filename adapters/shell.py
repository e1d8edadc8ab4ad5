"""The ``shell.run`` tool: run one program from an argv list, never through a shell.

The child runs in the workspace (or a directory inside it) with a minimal environment, in
a session and process group of its own, so that a timeout, a cancel or the end of the
step stops everything it started. Memory (the plan's ``memory_mb``) and CPU limits are
set with setrlimit by a tiny wrapper that then execs the program; ``preexec_fn`` is not
used because it is unsafe in a process with threads.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import sys
import time
from contextlib import suppress
from typing import Annotated, Any

import psutil
from pydantic import AfterValidator, Field

from adapters.base import Adapter, Health, Params, StepContext
from adapters.workspace import RelativePath
from planrun.errors import (
    AccessError,
    ConfigurationError,
    LogicError,
    ResourceError,
    StepError,
)

MIB = 1024 * 1024
KILL_GRACE_S = 1.0
PASSED_ENV = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
TAIL_CHARS = 4000
MESSAGE_TAIL_CHARS = 500

#: Run by ``python -I -S -c``: set the limits, then exec the program. The status pipe is
#: close-on-exec: EOF tells the parent the exec worked, otherwise it reads "errno:message".
_LIMITS_WRAPPER = r"""
import os, resource, sys
status = int(sys.argv[1])
try:
    for which, value, extra in ((resource.RLIMIT_AS, int(sys.argv[2]), 0),
                                (resource.RLIMIT_CPU, int(sys.argv[3]), 1)):
        if value > 0:
            hard = resource.getrlimit(which)[1]
            top = value + extra if hard == resource.RLIM_INFINITY else min(value + extra, hard)
            resource.setrlimit(which, (min(value, top), top))
    os.set_inheritable(status, False)
    os.execvp(sys.argv[4], sys.argv[4:])
except BaseException as exc:
    os.write(status, f"{getattr(exc, 'errno', 0) or 0}:{getattr(exc, 'strerror', 0) or exc}"
             .encode())
    os._exit(127)
"""

_MEMORY_WORDS = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc", re.I)
_BACKGROUND: set[asyncio.Task[None]] = set()


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    return value


Arg = Annotated[str, AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def _program_named(argv: list[str]) -> list[str]:
    if not argv or not argv[0]:
        raise ValueError("argv[0] must name the program to run")
    return argv


class ShellParams(Params):
    argv: Annotated[list[Arg], AfterValidator(_program_named)] = Field(
        min_length=1,
        description="The program and its arguments, run directly (never through a shell); "
                    "the program is looked up on PATH unless it contains a '/'.",
    )
    cwd: RelativePath | None = Field(
        default=None,
        description="Working directory, relative to the workspace root (default: the root).",
    )
    env: dict[EnvName, Arg] = Field(
        default_factory=dict,
        description="Environment variables added to a minimal environment "
                    "(PATH, HOME and LANG of planrun; not its whole environment).",
    )
    stdin: Arg | None = Field(default=None, description="Text fed to the program's stdin.")
    max_output_bytes: int = Field(
        default=MIB, ge=0, le=64 * MIB,
        description="Keep at most this many bytes of stdout and of stderr each; the rest is "
                    "read and dropped, and truncated is true.",
    )
    cpu_seconds: int | None = Field(
        default=None, ge=1, le=86400,
        description="CPU time limit of the program (RLIMIT_CPU), in seconds.",
    )


class ShellRun(Adapter[ShellParams]):
    """Runs a program: ``{"exit_code", "stdout", "stderr", "truncated", "duration_s"}``.

    A non-zero exit is a ``logic`` error carrying the exit code and the tail of stderr.
    """

    name = "shell.run"
    Params = ShellParams
    summary = "run a program (argv, no shell) in the workspace, with limits"

    async def execute(self, params: ShellParams, ctx: StepContext) -> dict[str, Any]:
        cwd = ctx.workspace.resolve(params.cwd) if params.cwd else ctx.workspace.real_root
        if not cwd.is_dir():
            raise ConfigurationError(
                f"shell.run: the working directory {params.cwd!r} is not a directory "
                "in the workspace", hint="create it first (file.write) or fix 'cwd'")
        memory = (ctx.memory_mb or 0) * MIB
        started = time.monotonic()
        proc, status = await _spawn_shielded(params, cwd, _child_env(params.env), memory)
        try:
            (out, out_cut), (err, err_cut), code = await _communicate(proc, params)
            _raise_exec_error(status, params.argv[0])
        finally:
            if status is not None:
                os.close(status)
        result = {
            "exit_code": code,
            "stdout": out.decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"),
            "truncated": out_cut or err_cut,
            "duration_s": round(time.monotonic() - started, 3),
        }
        if code != 0:
            raise _exit_error(params, result, memory_mb=ctx.memory_mb)
        return result

    def classify(self, exc: Exception) -> StepError:
        what = getattr(exc, "filename", None) or "the program"
        if isinstance(exc, FileNotFoundError):
            return ConfigurationError(
                f"shell.run: cannot run {what!r}: no such program or file",
                hint="install the program or put it on PATH (the step's env may set PATH), "
                     "or give its path relative to the working directory",
            )
        if isinstance(exc, PermissionError):
            return AccessError(
                f"shell.run: cannot run {what!r}: permission denied",
                hint="make it executable (chmod +x), or run it through its interpreter, "
                     "e.g. argv: [python3, script.py]",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENOEXEC, errno.E2BIG,
                                                      errno.ENOTDIR, errno.ENAMETOOLONG):
            return ConfigurationError(f"shell.run: cannot run {what!r}: {exc.strerror}",
                                      hint="check argv[0] and the size of the arguments")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOMEM, errno.EAGAIN):
            return ResourceError(f"shell.run: cannot start {what!r}: {exc.strerror}",
                                 hint="the machine is out of memory or processes; "
                                      "lower the plan's memory or parallelism")
        return super().classify(exc)

    async def health(self) -> Health:
        return Health(ok=True, detail="programs run from argv, without a shell")


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env | extra


async def _spawn_shielded(params: ShellParams, cwd: os.PathLike[str], env: dict[str, str],
                          memory: int) -> tuple[asyncio.subprocess.Process, int | None]:
    """``_spawn``, finished even when cancelled: asyncio's own cancel of a starting
    process kills only the direct child; here the whole new group is stopped instead."""
    spawning = asyncio.ensure_future(_spawn(params, cwd, env, memory))
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with suppress(Exception):
            proc, status = await spawning
            if status is not None:
                os.close(status)
            await _stop(proc, [])
        raise


async def _spawn(params: ShellParams, cwd: os.PathLike[str], env: dict[str, str],
                 memory: int) -> tuple[asyncio.subprocess.Process, int | None]:
    """Start the program in a new session; with limits, through the wrapper and its pipe."""
    options: dict[str, Any] = {
        "stdin": asyncio.subprocess.PIPE if params.stdin is not None
        else asyncio.subprocess.DEVNULL,
        "stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE,
        "cwd": cwd, "env": env, "start_new_session": True,
    }
    if not (memory or params.cpu_seconds):
        return await asyncio.create_subprocess_exec(*params.argv, **options), None
    status_read, status_write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", _LIMITS_WRAPPER, str(status_write),
            str(memory), str(params.cpu_seconds or 0), *params.argv,
            pass_fds=(status_write,), **options)
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    return proc, status_read


async def _communicate(proc: asyncio.subprocess.Process, params: ShellParams
                       ) -> tuple[tuple[bytes, bool], tuple[bytes, bool], int]:
    """Feed stdin, capture capped output and wait; stop the whole group if interrupted."""
    assert proc.stdout is not None and proc.stderr is not None
    cap = params.max_output_bytes
    readers = [asyncio.ensure_future(_drain(proc.stdout, cap)),
               asyncio.ensure_future(_drain(proc.stderr, cap))]
    tasks: list[asyncio.Future[Any]] = list(readers)
    if params.stdin is not None:
        tasks.append(asyncio.ensure_future(_feed(proc, params.stdin.encode())))
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
        stopping = asyncio.ensure_future(_stop(proc, tasks))
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


async def _stop(proc: asyncio.subprocess.Process, tasks: list[asyncio.Future[Any]]) -> None:
    """Kill the group, let the pipes drain to EOF, reap the program."""
    await _terminate(proc)
    _, pending = await asyncio.wait(tasks, timeout=KILL_GRACE_S)
    for task in pending:
        task.cancel()
    with suppress(TimeoutError):
        await asyncio.wait_for(_exit_code(proc), KILL_GRACE_S)
    transport = getattr(proc, "_transport", None)
    if pending and transport is not None:
        # A process that left the group (setsid) still holds the pipes: stop listening.
        transport.close()
        await asyncio.sleep(0)  # the pipes close in a callback of the next loop pass


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


def _raise_exec_error(status: int | None, program: str) -> None:
    """Raise the wrapper's exec failure as the OSError a direct exec would have raised."""
    if status is None:
        return
    report = os.read(status, 4096).decode("utf-8", "replace")
    if not report:
        return
    code, _, message = report.partition(":")
    if not int(code or 0):
        raise ConfigurationError(f"shell.run: could not set the resource limits: {message}",
                                 hint="lower the plan's memory_mb or the step's cpu_seconds")
    raise OSError(int(code), message, program)


def _exit_error(params: ShellParams, result: dict[str, Any], *, memory_mb: int | None
                ) -> StepError:
    code, stderr = result["exit_code"], result["stderr"]
    tail = stderr[-MESSAGE_TAIL_CHARS:].strip() or "(nothing on stderr)"
    details = {"exit_code": code, "stderr_tail": stderr[-TAIL_CHARS:],
               "stdout_tail": result["stdout"][-TAIL_CHARS:], "argv": params.argv}
    program = params.argv[0]
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and params.cpu_seconds):
        limit = f" of {params.cpu_seconds}s" if params.cpu_seconds else ""
        return ResourceError(
            f"shell.run: {program!r} used up its CPU limit{limit} (exit {code}): {tail}",
            hint="raise the step's cpu_seconds, or give the program less work", details=details)
    memory_signal = code in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT)
    if memory_mb and (memory_signal or _MEMORY_WORDS.search(tail)):
        return ResourceError(
            f"shell.run: {program!r} ran out of memory under its limit of {memory_mb} MiB "
            f"(exit {code}): {tail}",
            hint="raise the plan's limits.memory_mb, or give the program less work",
            details=details)
    if code == -signal.SIGKILL:
        return ResourceError(
            f"shell.run: {program!r} was killed by SIGKILL, most likely for using too much "
            f"memory: {tail}",
            hint="give the program less work, or run it on a machine with more memory",
            details=details)
    return LogicError(
        f"shell.run: {program!r} exited with code {code}: {tail}",
        hint="the command failed: read its stderr in the error details, then fix the "
             "command, its input or its working directory", details=details)
