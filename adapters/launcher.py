"""How a step's program is started: a small launcher between planrun and the program.

The launcher (``python -I -S -c LAUNCHER``) forks; its child joins the step's control
groups (``adapters/cgroups.py``), sets the rlimits and execs the program (or
bubblewrap); the launcher itself stays outside those groups, reaps the child with
``wait4`` and reports, on the status pipe, what the reaped tree used: CPU seconds, the
largest resident set of any one process, and the bytes it had the kernel store
(``write_bytes`` of ``/proc/self/io``, which gains a child's count, and its reaped
descendants', when the child is reaped). It then ends as the child ended (the same exit
code, or the same signal), so the caller sees the program's outcome. planrun reaps its
own children at once (``adapters/process.py``), so without this parent the tree's counts
would be lost with it. The launcher is started with ``os.posix_spawn``: nothing to
await, so a cancel or a loop shutting down cannot catch it half started.

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from planrun.adapters import sandbox
from planrun.adapters.process import Child
from planrun.adapters.process import spawn as spawn_child
from planrun.adapters.sandbox import Limits
from planrun.errors import ConfigurationError
from planrun.home import data_dir

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("launcher.c")
#: ``python``: use the Python launcher even where the C one can be built.
CHOICE_ENV = "PLANRUN_LAUNCHER"

LAUNCHER = r"""
import os, resource, signal, sys, time
status, go, procs, sandboxed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
os.chdir("/")  # hold no directory of planrun's busy; the program's cwd is in its message
os.closerange(max(status, go) + 1, os.sysconf("SC_OPEN_MAX"))  # nothing else is the program's
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
        stage, chunks = "exec", []
        while chunk := os.read(go, 65536):
            chunks.append(chunk)
        os.close(go)
        fields = b"".join(chunks).split(b"\0")[:-1]
        if not fields:
            os._exit(0)  # started ahead, not needed
        count = int(fields[5])
        argv, at = fields[6:6 + count], 6 + count
        env = dict(entry.split(b"=", 1) for entry in fields[at + 1:at + 1 + int(fields[at])])
        at += 1 + int(fields[at])
        options = fields[at + 1:at + 1 + int(fields[at])]
        if not argv or len(options) != int(fields[at]):
            raise OSError(22, "Invalid argument")
        stage = "limits"
        for which, value, extra in ((resource.RLIMIT_AS, int(fields[0]), 0),
                                    (resource.RLIMIT_CPU, int(fields[1]), 1),
                                    (resource.RLIMIT_FSIZE, int(fields[2]), 0),
                                    (resource.RLIMIT_NPROC, int(fields[3]), 0)):
            if value > 0:
                hard = resource.getrlimit(which)[1]
                top = value + extra
                top = top if hard == resource.RLIM_INFINITY else min(top, hard)
                resource.setrlimit(which, (min(value, top), top))
        stage = "exec"
        os.chdir(fields[4])
        if options:  # bubblewrap's options in an anonymous file: --args FD
            fd = os.memfd_create("bwrap-args", 0)
            os.set_inheritable(fd, True)
            os.write(fd, b"".join(option + b"\0" for option in options))
            os.lseek(fd, 0, os.SEEK_SET)
            argv = [argv[0], b"--args", str(fd).encode(), *argv[1:]]
        os.set_inheritable(status, False)
        if sandboxed:
            os.execve(argv[0], argv, env)
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        os.write(status, f"{stage}:{getattr(exc, 'errno', 0) or 0}:"
                         f"{getattr(exc, 'strerror', 0) or exc}\n".encode())
        os._exit(127)
os.close(go)
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


def launch_argv(status_fd: int, go_fd: int, procs: list[str], *,
                sandboxed: bool = False) -> list[str]:
    """The command that starts a launcher whose child joins the groups whose
    ``cgroup.procs`` files are ``procs`` at once, then waits for its program
    (``program_message``) on ``go_fd``; it reports on ``status_fd``. ``sandboxed``: the
    program is bubblewrap, execed as given (so ``argv[0]`` must be an absolute path), and
    the sandbox's PID 1, which bubblewrap does not reap, is adopted and reaped too (its
    counts hold the program's)."""
    return [*launcher_command(), str(status_fd), str(go_fd), "\n".join(procs),
            "1" if sandboxed else "0"]


def program_message(argv: list[str], env: dict[str, str], cwd: Path | str, limits: Limits,
                    options: list[str] | None = None) -> bytes:
    """What a launcher's child reads on its go pipe: NUL-terminated fields (adapters/
    launcher.c): the limits, cwd, then argv, the environment and bubblewrap's ``options``
    (passed to ``argv[0]`` as ``--args FD``), each after its count."""
    fields = [str(limits.memory_bytes), str(limits.cpu_seconds), str(limits.file_bytes),
              str(limits.processes), str(cwd), str(len(argv)), *argv, str(len(env)),
              *(f"{key}={value}" for key, value in env.items()), str(len(options or [])),
              *(options or [])]
    if any("\0" in field for field in fields):
        raise ValueError("embedded null byte")  # as subprocess says
    return b"".join(field.encode("utf-8", "surrogateescape") + b"\0" for field in fields)


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


@dataclass(frozen=True)
class Launched:
    """A launcher whose child has joined its groups and waits for its program on ``go``."""

    proc: Child
    #: The read end of its status pipe, and the write end of its go pipe.
    status: int
    go: int
    sandboxed: bool


#: The launcher's status and go pipes, as its descriptors (after stdin, stdout, stderr).
STATUS_FD, GO_FD = 3, 4


def start_launcher(procs: list[str], sandboxed: bool) -> Launched:
    """A launcher in a new session, its child in the groups of ``procs``, waiting for its
    program; started at once (``adapters/process.spawn``: nothing to await, so nothing a
    cancel could leave half done). It runs in ``/`` with an empty environment: the
    program's come in its message. Its stdin is a pipe, closed at once for a program given
    no input."""
    status_read, status_write = os.pipe()
    go_read, go_write = os.pipe()
    try:
        proc = spawn_child(launch_argv(STATUS_FD, GO_FD, procs, sandboxed=sandboxed), {},
                           (status_write, go_read))
    except BaseException:
        os.close(status_read)
        os.close(go_write)
        raise
    finally:
        os.close(status_write)
        os.close(go_read)
    return Launched(proc, status_read, go_write, sandboxed)


def spawn(start: Start, stdin: bool, ready: Launched | None = None) -> tuple[Child, int]:
    """The program of ``start`` through the ``ready`` launcher, else a new one; the
    process and the read end of its status pipe."""
    if ready is not None:
        return go(ready, start, stdin)
    message = _message(start)  # before the launcher starts: an argument may be refused
    return go(start_launcher(start.procs, start.options is not None), start, stdin, message)


def go(launched: Launched, start: Start, stdin: bool, message: bytes | None = None
       ) -> tuple[Child, int]:
    """Hand ``launched`` the program of ``start``; the process and the read end of its
    status pipe. Its stdin is closed at once when the program is given none. What does
    not fit in the go pipe now (over 64 KiB: a long argv or environment) is written as
    the child reads it, from the event loop, not waited for here: a new launcher's child
    reads only once it has joined its groups (up to 20 ms on a loaded machine)."""
    unsent = memoryview(message if message is not None else _message(start))
    os.set_blocking(launched.go, False)
    _send(launched.go, unsent, asyncio.get_running_loop())
    if not stdin:
        launched.proc.close_stdin()
    return launched.proc, launched.status


def _send(fd: int, unsent: memoryview, loop: asyncio.AbstractEventLoop) -> None:
    """Write ``unsent`` to the go pipe ``fd``, the rest once it can take more; then close
    it (the child reads to its end). A child that failed to join its groups has closed
    its end: the status pipe says why."""
    try:
        while unsent:
            unsent = unsent[os.write(fd, unsent):]
    except BlockingIOError:
        loop.add_writer(fd, _send_more, fd, unsent, loop)
        return
    except BrokenPipeError:
        pass
    os.close(fd)


def _send_more(fd: int, unsent: memoryview, loop: asyncio.AbstractEventLoop) -> None:
    loop.remove_writer(fd)
    _send(fd, unsent, loop)


def _message(start: Start) -> bytes:
    """The program message of ``start``. Sandboxed, the program is bubblewrap with the
    sandbox's options, started with an empty environment: it is the sandbox's PID 1, whose
    environment the program could read."""
    if start.options is None:
        return program_message(start.argv, start.env, start.cwd, start.limits)
    return program_message([sandbox.bwrap_path(), "--", *start.argv], {}, start.cwd,
                           start.limits, start.options)


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
