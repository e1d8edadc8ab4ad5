"""How a step's program is started: a small launcher between planrun and the program.

The launcher (``python -I -S -c LAUNCHER``) forks; its child joins the step's control
groups (``adapters/cgroups.py``), sets the rlimits and execs the program (or
bubblewrap); the launcher itself stays outside those groups, reaps the child with
``wait4`` and reports, on the status pipe, what the reaped tree used: CPU seconds, the
largest resident set of any one process, and the bytes it had the kernel store
(``write_bytes`` of ``/proc/self/io``, which gains a child's count, and its reaped
descendants', when the child is reaped). It then ends as the child ended (the same exit
code, or the same signal), so the caller sees the program's outcome. asyncio reaps its
own children at once, so without this parent the tree's counts would be lost with it.

The launcher is ``adapters/launcher.c``, compiled once per machine into the data directory
(``launcher_command``): a Python interpreter's start costs ≈ 20 ms a step
(BENCHMARKS.md, "Resources per step"). Where no C compiler is found, or
``PLANRUN_LAUNCHER=python``, the same launcher in Python (``LAUNCHER``) runs instead.

The launcher ignores SIGTERM, SIGINT and SIGHUP: stopping a step signals its whole process
group, and the launcher should outlive the program long enough to report. When planrun's
process dies without stopping the step (SIGKILL, a crash), the status pipe loses its only
reader: the launcher sees that (an error on its write end) and kills the step's control
groups and its own process group, so no program outlives its run; a recovered run would
otherwise run the step again beside it. The status pipe
carries lines ``stage:errno:message`` (stage ``limits`` or ``exec``: the program did not
start) and ``usage:cpu_s:maxrss_bytes:written_bytes`` (written -1: not counted here).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from planrun.adapters import sandbox
from planrun.adapters.process import stop
from planrun.adapters.sandbox import Limits
from planrun.errors import ConfigurationError
from planrun.home import data_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("launcher.c")
#: ``python``: use the Python launcher even where the C one can be built.
CHOICE_ENV = "PLANRUN_LAUNCHER"

LAUNCHER = r"""
import os, resource, signal, sys, time
status, memory, cpu, fsize, nproc = (int(v) for v in sys.argv[1:6])
procs, sandboxed, argv = sys.argv[6], sys.argv[7] == "1", sys.argv[8:]
if sandboxed:  # bubblewrap leaves its PID 1 to be reaped by whoever adopts it: us
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    stage = "limits"
    try:
        for path in procs.split("\n") if procs else ():
            with open(path, "w") as group:
                group.write(str(os.getpid()))
        for which, value, extra in ((resource.RLIMIT_AS, memory, 0),
                                    (resource.RLIMIT_CPU, cpu, 1),
                                    (resource.RLIMIT_FSIZE, fsize, 0),
                                    (resource.RLIMIT_NPROC, nproc, 0)):
            if value > 0:
                hard = resource.getrlimit(which)[1]
                top = value + extra
                top = top if hard == resource.RLIM_INFINITY else min(top, hard)
                resource.setrlimit(which, (min(value, top), top))
        os.set_inheritable(status, False)
        stage = "exec"
        if sandboxed:
            os.execve(argv[0], argv, {})
        os.execvp(argv[0], argv)
    except BaseException as exc:
        os.write(status, f"{stage}:{getattr(exc, 'errno', 0) or 0}:"
                         f"{getattr(exc, 'strerror', 0) or exc}\n".encode())
        os._exit(127)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
try:  # planrun gone (the status pipe has no reader): kill what the step started, and us
    pidfd = os.pidfd_open(child)
except OSError:
    pidfd = None
if pidfd is not None:
    import contextlib, select
    watched = select.poll()
    watched.register(pidfd, select.POLLIN)
    watched.register(status, 0)
    while pidfd not in (ready := dict(watched.poll())):
        if ready.get(status, 0) & (select.POLLERR | select.POLLHUP):
            for _ in range(100):  # the step's groups until empty (cgroup v1: no cgroup.kill)
                left = 0
                for path in procs.split("\n") if procs else ():
                    try:
                        with open(path) as group:
                            pids = [int(pid) for pid in group.read().split()]
                    except OSError:
                        pids = []
                    for pid in pids:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    left += len(pids)
                if not left:
                    break
                time.sleep(0.01)
            os.kill(0, signal.SIGKILL)
    os.close(pidfd)
_, code, used = os.wait4(child, 0)
cpu_s, maxrss = used.ru_utime + used.ru_stime, used.ru_maxrss
deadline = time.monotonic() + 0.5
while sandboxed:
    try:
        pid, _, more = os.wait4(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    elif pid == 0:
        break
    else:
        cpu_s, maxrss = cpu_s + more.ru_utime + more.ru_stime, max(maxrss, more.ru_maxrss)
try:
    with open("/proc/self/io") as io:
        written = int(dict(line.split(": ") for line in io.read().splitlines())["write_bytes"])
except (OSError, KeyError, ValueError):
    written = -1
os.write(status, f"usage:{cpu_s}:{maxrss * 1024}:{written}\n".encode())
if os.WIFSIGNALED(code):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        signal.signal(os.WTERMSIG(code), signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL and SIGSTOP keep their default
    os.kill(os.getpid(), os.WTERMSIG(code))
os._exit(os.waitstatus_to_exitcode(code) if os.WIFEXITED(code) else 1)
"""


def launch_argv(argv: list[str], limits: Limits, status_fd: int, procs: list[str], *,
                sandboxed: bool = False) -> list[str]:
    """The command that starts ``argv`` under ``limits`` in the groups whose
    ``cgroup.procs`` files are ``procs``, reporting on ``status_fd``. ``sandboxed``:
    ``argv`` is bubblewrap's, execed with an empty environment (so ``argv[0]`` must be an
    absolute path), and the sandbox's PID 1, which bubblewrap does not reap, is adopted
    and reaped too (its counts hold the program's)."""
    return [*launcher_command(), str(status_fd),
            str(limits.memory_bytes), str(limits.cpu_seconds), str(limits.file_bytes),
            str(limits.processes), "\n".join(procs), "1" if sandboxed else "0", *argv]


def launcher_command() -> list[str]:
    """The launcher to start: the C one (built if needed), else the Python one."""
    if os.environ.get(CHOICE_ENV) != "python":
        built = _built(str(data_dir()))
        if built is not None:
            return [built]
    return [sys.executable, "-I", "-S", "-c", LAUNCHER]


@lru_cache(maxsize=4)
def _built(home: str) -> str | None:
    """The compiled launcher under ``home``, compiled on first use; None when it cannot be
    (no compiler, no source): the Python launcher then serves, with a warning once."""
    try:
        source = SOURCE.read_bytes()
    except OSError:
        return None
    binary = Path(home) / "bin" / f"launcher-{hashlib.sha256(source).hexdigest()[:16]}"
    if os.access(binary, os.X_OK):
        return str(binary)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc): shell.run starts its programs through the slower "
                    "Python launcher")
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    try:
        subprocess.run([compiler, "-O2", "-o", str(partial), str(SOURCE)], check=True,
                       capture_output=True, timeout=60)
        os.replace(partial, binary)  # atomic: another process may build it at once
    except (OSError, subprocess.SubprocessError) as exc:
        partial.unlink(missing_ok=True)
        log.warning("could not build the C launcher (%s): shell.run uses the Python one", exc)
        return None
    return str(binary)


@dataclass(frozen=True)
class Usage:
    """What the launcher reported of the reaped tree."""

    cpu_s: float
    maxrss_bytes: int
    #: None where the kernel does not count it (no task I/O accounting).
    written_bytes: int | None


@dataclass(frozen=True)
class Report:
    """The launcher's status pipe, read once it has exited."""

    #: (stage, errno, message) when the program did not start.
    failure: tuple[str, int, str] | None = None
    usage: Usage | None = None


def read_report(fd: int) -> Report:
    """What the launcher wrote on ``fd`` (non-blocking: a launcher killed before it wrote
    leaves nothing, and a live one is not waited for)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    failure, usage = None, None
    for line in data.decode("utf-8", "replace").splitlines():
        stage, _, rest = line.partition(":")
        if stage == "usage":
            cpu, maxrss, written = rest.split(":")
            usage = Usage(float(cpu), int(maxrss), int(written) if int(written) >= 0 else None)
        elif stage in ("limits", "exec"):
            code, _, message = rest.partition(":")
            failure = (stage, int(code or 0), message)
    return Report(failure, usage)


@dataclass(frozen=True)
class Start:
    """How to start one step's program: sandboxed when ``options`` (bubblewrap's) is set,
    in ``procs`` (its control groups' ``cgroup.procs`` files) where there are any."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    limits: Limits
    options: list[str] | None
    procs: list[str]


async def spawn_shielded(start: Start, stdin: bool) -> tuple[asyncio.subprocess.Process, int]:
    """``spawn``, finished even when cancelled: asyncio's own cancel of a starting
    process kills only the direct child; here the whole new group is stopped instead."""
    spawning = asyncio.ensure_future(spawn(start, stdin))
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with suppress(Exception):
            proc, status = await spawning
            os.close(status)
            await stop(proc, [])
        raise


async def spawn(start: Start, stdin: bool) -> tuple[asyncio.subprocess.Process, int]:
    """Start the launcher in a new session, and through it the program (in bubblewrap
    when sandboxed); the process and the read end of its status pipe. bubblewrap starts
    with an empty environment: it is the sandbox's PID 1, whose environment the program
    could read."""
    options: dict[str, Any] = {
        "stdin": asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        "stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE,
        "cwd": start.cwd, "env": start.env, "start_new_session": True,
    }
    argv, fds = start.argv, []
    if start.options is not None:
        fds.append(sandbox.options_fd(start.options))
        argv = [sandbox.bwrap_path(), "--args", str(fds[0]), "--", *argv]
        options["env"] = {}
    status_read, status_write = os.pipe()
    fds.append(status_write)
    try:
        proc = await asyncio.create_subprocess_exec(
            *launch_argv(argv, start.limits, status_write, start.procs,
                         sandboxed=start.options is not None),
            pass_fds=tuple(fds), **options)
    except BaseException:
        os.close(status_read)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return proc, status_read


def raise_start_failure(report: Report, program: str) -> None:
    """Raise why the program did not start: an exec failure as the OSError a direct exec
    would have raised, a failure to set the limits as a configuration error."""
    if report.failure is None:
        return
    stage, code, message = report.failure
    if stage != "exec" or not code:
        raise ConfigurationError(f"shell.run: could not set the resource limits: {message}",
                                 hint="lower the plan's memory_mb or the step's cpu_seconds")
    raise OSError(code, message, program)
