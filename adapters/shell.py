"""The ``shell.run`` tool: run one program from an argv list, never through a shell.

Where the policy asks for it (always for submitted plans) the program runs inside the
bubblewrap sandbox of ``adapters/sandbox.py``, with limits on processes, file size,
memory and CPU time (docs/sandbox.md); where bubblewrap cannot start, a submitted plan
may not use ``shell.run`` and a local run goes on unconfined, saying so once.

Unconfined, the child runs in the workspace (or a directory inside it) with a minimal
environment, in a session and process group of its own, so that a timeout, a cancel or
the end of the step stops everything it started. Every program starts through the
launcher of ``adapters/launcher.py``, which puts it in the step's control groups, sets
its rlimits and reports what its tree used (``preexec_fn`` is not used because it is
unsafe in a process with threads); ``adapters/watch.py`` lowers the priority of a
long-running program and stops a tree over its CPU limit (docs/resources.md).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import time
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from planrun.adapters import cgroups, sandbox, warm
from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.executables import allowed_argv
from planrun.adapters.launcher import (
    Launched,
    Start,
    raise_start_failure,
    read_report,
    spawn,
)
from planrun.adapters.process import communicate
from planrun.adapters.sandbox import Limits
from planrun.adapters.usage import ensure_room
from planrun.adapters.watch import TreeWatch
from planrun.adapters.workspace import RelativePath
from planrun.errors import (
    AccessError,
    ConfigurationError,
    LogicError,
    ResourceError,
    StepError,
)
from planrun.policy import current_trust, load_policy

MIB = 1024 * 1024
PASSED_ENV = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
TAIL_CHARS = 4000
MESSAGE_TAIL_CHARS = 500

_MEMORY_WORDS = re.compile(r"MemoryError|Cannot allocate memory|out of memory|bad_alloc", re.I)
_FORK_WORDS = re.compile(r"fork|Resource temporarily unavailable", re.I)
_FILE_WORDS = re.compile(r"File too large|File size limit exceeded", re.I)
#: What bubblewrap says when the program cannot be started: "bwrap: execvp PROG: REASON".
_BWRAP_EXEC = re.compile(r"^bwrap: execvp (?P<program>.*): (?P<reason>[^\n]*)\n?\Z", re.M)
_ERRNO_OF = {os.strerror(code): code for code in (errno.ENOENT, errno.EACCES, errno.ENOEXEC,
                                                  errno.E2BIG, errno.ENOTDIR, errno.ENOMEM)}
#: Problems already reported by the once-per-process "runs unconfined" warning.
_WARNED: set[str] = set()


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
    in_process = False  # its program's whole tree is measured (adapters/watch.py)

    async def execute(self, params: ShellParams, ctx: StepContext) -> dict[str, Any]:
        root = ctx.workspace.real_root
        cwd = ctx.workspace.resolve(params.cwd) if params.cwd else root
        if not cwd.is_dir():
            raise ConfigurationError(
                f"shell.run: the working directory {params.cwd!r} is not a directory "
                "in the workspace", hint="create it first (file.write) or fix 'cwd'")
        sandboxed = await _sandboxed(ctx)
        env = sandbox.sandbox_env(root, params.env) if sandboxed else _child_env(params.env)
        argv = allowed_argv(params.argv, str(cwd), env.get("PATH", DEFAULT_PATH),
                            ctx.policy.executables)
        ensure_room(self.name, cwd, 0, ctx.policy)  # a full disk fails now, with a hint
        limits = _within_quota(sandbox.step_limits(ctx.memory_mb, params.cpu_seconds,
                                                   ctx.policy.ceilings, sandboxed=sandboxed),
                               ctx)
        options = (sandbox.bwrap_options(workspace=root, cwd=cwd, env=params.env,
                                         policy=ctx.policy) if sandboxed else None)
        # A launcher started ahead, in a group of its own (adapters/warm.py), or a new
        # group; taken here, not in a thread, so that a cancel cannot lose one.
        ready, group = _ready(await warm.take(options is not None), limits)
        start = Start(argv, env, cwd, _launcher_limits(limits, group), options,
                      group.procs_files() if group is not None else [])
        try:
            return await _run(params, start, _Watched(limits, group), ctx, ready)
        finally:
            if group is not None:
                _remove_soon(group)

    def classify(self, exc: Exception) -> StepError:
        what = getattr(exc, "filename", None) or "the program"
        if isinstance(exc, FileNotFoundError):
            return ConfigurationError(
                f"shell.run: cannot run {what!r}: no such program or file",
                hint="install the program or put it on PATH (the step's env may set PATH), "
                     "or give its path relative to the working directory; in the sandbox "
                     "only /usr, the workspace and the policy's binds exist",
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
        """Whether the sandbox works: without it submitted plans cannot use shell.run. Only
        where the trust level's policy requires the sandbox is its absence unhealthy."""
        problem = await asyncio.to_thread(sandbox.sandbox_problem)
        if problem is None:
            return Health(ok=True, detail=f"programs run in the sandbox ({sandbox.bwrap_path()})")
        required = load_policy().level(current_trust()).sandbox == "required"
        return Health(ok=not required, detail=f"no sandbox: {problem}; submitted plans cannot "
                                              "use shell.run, local runs are unconfined")


@dataclass(frozen=True)
class _Watched:
    """The limits of one step's program, and its control group if it has one."""

    limits: Limits
    group: cgroups.StepGroup | None


def _within_quota(limits: Limits, ctx: StepContext) -> Limits:
    """No file may be larger than what is left of the run's write quota (RLIMIT_FSIZE)."""
    left = ctx.usage.quota_left(ctx.policy.workspace_quota_mb)
    if left is None:
        return limits
    return replace(limits, file_bytes=min(limits.file_bytes or left, max(left, 1)))


def _launcher_limits(limits: Limits, group: cgroups.StepGroup | None) -> Limits:
    """The rlimits the launcher sets: memory and processes only where the group does not
    limit them (RLIMIT_AS counts address space, not memory: a last resort)."""
    if group is None:
        return limits
    return replace(limits, memory_bytes=0 if group.memory_limited else limits.memory_bytes,
                   processes=0 if "pids" in group.dirs else limits.processes)


async def _sandboxed(ctx: StepContext) -> bool:
    """Whether to run in the sandbox: as the policy says, where bubblewrap can start."""
    if ctx.policy.sandbox == "off":
        return False
    probe = sandbox.sandbox_problem
    problem = probe() if sandbox.probed() else await asyncio.to_thread(probe)
    if problem is None:
        return True
    if ctx.policy.sandbox == "required":
        raise ConfigurationError(
            f"shell.run needs the bubblewrap sandbox for {ctx.trust} plans, and it cannot "
            f"start here: {problem}",
            hint="install bubblewrap (scripts/install does: apt-get install bubblewrap); "
                 "see docs/sandbox.md")
    if problem not in _WARNED:
        _WARNED.add(problem)
        ctx.logger.warning("shell.run runs programs UNCONFINED (no sandbox): %s; install "
                           "bubblewrap to confine them (docs/sandbox.md)", problem)
    return False


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env | extra


#: Groups being removed in a thread (a reference, so that the task is not collected).
_REMOVING: set[asyncio.Future[Any]] = set()


def _remove_soon(group: cgroups.StepGroup) -> None:
    """Remove the step's group once its result is handed on (≈ 0.4 ms for four v1
    directories, BENCHMARKS.md "Resources per step"): empty, as the launcher reaped the
    tree, at once; else in a thread that kills what is left and waits for it to go."""
    loop = asyncio.get_running_loop()

    def remove() -> None:
        if not group.remove(within=0):
            removing = asyncio.ensure_future(asyncio.to_thread(group.remove))
            _REMOVING.add(removing)
            removing.add_done_callback(_REMOVING.discard)

    loop.call_soon(remove)


def _ready(kept: tuple[Launched, cgroups.StepGroup | None] | None, limits: Limits
           ) -> tuple[Launched | None, cgroups.StepGroup | None]:
    """The launcher ``kept`` for this step and its group, limited to ``limits``; else no
    launcher (a new one starts with the program) and a new group, or none."""
    if kept is None:
        return None, cgroups.make_step_group(limits.memory_bytes, limits.processes)
    ready, group = kept
    limited = cgroups.limit(group, limits.memory_bytes, limits.processes) if group else None
    if group is not None and limited is None:  # its process limit could not be set
        warm.dismiss(ready, group)
        return None, None
    return ready, limited


async def _run(params: ShellParams, start: Start, watched: _Watched,
               ctx: StepContext, ready: Launched | None) -> dict[str, Any]:
    started = time.monotonic()
    proc, status = spawn(start, params.stdin is not None, ready)
    sandboxed = start.options is not None
    # The next step's launcher: while this program runs, if it runs long enough for the
    # start to overlap it, else once it has ended (adapters/warm.py).
    ahead = asyncio.get_running_loop().call_later(warm.AHEAD_AFTER_S, warm.keep, sandboxed)
    watch = TreeWatch(proc.pid, watched.group, watched.limits.cpu_seconds)
    watch.start()
    try:
        stdin = params.stdin.encode() if params.stdin is not None else None
        (out, out_cut), (err, err_cut), code = await communicate(
            proc, stdin, params.max_output_bytes)
    finally:
        ahead.cancel()
        watch.stop()
        report = read_report(status)
        os.close(status)
        ctx.usage.ran(watch.measured(report.usage))  # also when stopped: it ran until then
    warm.keep(sandboxed)
    raise_start_failure(report, start.argv[0])
    if sandboxed:
        code = _bwrap_outcome(code, err)
    result = {
        "exit_code": code,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "truncated": out_cut or err_cut,
        "duration_s": round(time.monotonic() - started, 3),
    }
    if code != 0:
        cause = "memory" if watch.memory_killed() else "cpu" if watch.cpu_exceeded else None
        raise _exit_error(params, result, watched.limits, cause)
    _check_quota(ctx)
    return result


def _check_quota(ctx: StepContext) -> None:
    """A run whose programs wrote more than its quota fails the step that took it over."""
    quota = ctx.policy.workspace_quota_mb
    if quota is not None and ctx.usage.run.written > quota * MIB:
        wrote = ctx.usage.programs.written_bytes if ctx.usage.programs else 0
        raise ctx.usage.over_quota("shell.run", quota, f"its program wrote {wrote} bytes")


def _bwrap_outcome(code: int, stderr: bytes) -> int:
    """The program's exit code from bubblewrap's: 128+N for a signal becomes -N, as for a
    direct child; bubblewrap's own failures are raised (an exec failure as an OSError)."""
    said = stderr.decode("utf-8", "replace")
    if code == 1 and (failed := _BWRAP_EXEC.search(said)):
        reason = failed["reason"]
        raise OSError(_ERRNO_OF.get(reason, errno.EINVAL), reason, failed["program"])
    if code == 1 and said.startswith("bwrap: "):
        raise ConfigurationError(
            f"shell.run: the sandbox could not start: {said.strip()[:MESSAGE_TAIL_CHARS]}",
            hint="check the policy's binds and the workspace (docs/sandbox.md)")
    if 128 < code < 128 + signal.NSIG:
        return -(code - 128)
    return code


def _exit_error(params: ShellParams, result: dict[str, Any], limits: Limits,
                cause: str | None) -> StepError:
    """The error of a non-zero exit; ``cause``: the tree was killed at its ``memory`` or
    ``cpu`` limit (known from its control group)."""
    code, stderr = result["exit_code"], result["stderr"]
    tail = stderr[-MESSAGE_TAIL_CHARS:].strip() or "(nothing on stderr)"
    details = {"exit_code": code, "stderr_tail": stderr[-TAIL_CHARS:],
               "stdout_tail": result["stdout"][-TAIL_CHARS:], "argv": params.argv}
    program = params.argv[0]
    memory_mb = limits.memory_bytes // MIB
    if cause == "memory":
        return ResourceError(
            f"shell.run: {program!r} was killed at its memory limit of {memory_mb} MiB "
            f"(exit {code}): {tail}",
            hint="raise the step's memory_mb (or the plan's limits.memory_mb), or give the "
                 "program less work", details=details)
    if cause == "cpu" or code == -signal.SIGXCPU or (code == -signal.SIGKILL
                                                     and limits.cpu_seconds):
        limit = f" of {limits.cpu_seconds}s" if limits.cpu_seconds else ""
        return ResourceError(
            f"shell.run: {program!r} used up its CPU limit{limit} (exit {code}): {tail}",
            hint="raise the step's cpu_seconds, or give the program less work", details=details)
    if limits.file_bytes and (code == -signal.SIGXFSZ or _FILE_WORDS.search(tail)):
        return ResourceError(
            f"shell.run: {program!r} tried to write a file larger than its limit of "
            f"{limits.file_bytes // MIB} MiB (exit {code}): {tail}",
            hint="write less, or ask the operator to raise ceilings.file_mb in the policy",
            details=details)
    if limits.processes and _FORK_WORDS.search(tail):
        return ResourceError(
            f"shell.run: {program!r} could not start more processes: its limit is "
            f"{limits.processes} (exit {code}): {tail}",
            hint="start fewer processes at once, or ask the operator to raise "
                 "ceilings.processes in the policy", details=details)
    memory_signal = code in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT)
    if memory_mb and (memory_signal or _MEMORY_WORDS.search(tail)):
        return ResourceError(
            f"shell.run: {program!r} ran out of memory under its limit of {memory_mb} MiB "
            f"(exit {code}): {tail}",
            hint="raise the step's memory_mb (or the plan's limits.memory_mb), or give the "
                 "program less work",
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
