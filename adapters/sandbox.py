"""The sandbox of ``shell.run``: bubblewrap's command line and the limits of what runs in it.

What a sandboxed program sees (docs/sandbox.md): ``/usr`` (and the ``/bin``, ``/lib*``
links into it) read-only, a few files of ``/etc`` read-only, a fresh ``/tmp``, ``/proc``
(of its own PID namespace) and a minimal ``/dev``, the workspace writable at the same
path, the policy's ``binds`` and nothing else. It runs as uid 65534 in a user namespace
(no capabilities), in new PID, network, IPC and UTS namespaces, in a session of its own,
with an environment of PATH, HOME (the workspace), LANG and the step's ``env``. The
namespace's PID 1 is bubblewrap itself, started with an empty environment; when the
program exits or bubblewrap is killed, every process left in the namespace is killed.

Limits are set by the launcher (adapters/launcher.py) that then execs bubblewrap (or,
unconfined, the program): setrlimit for CPU time and file size, and the step's control
groups (adapters/cgroups.py) for memory and the number of processes, where they can be
made (root, cgroup v1 or a delegated v2 tree). RLIMIT_NPROC is no use there: the kernel
does not enforce it for root, and the user namespace maps the sandbox's uid to the
caller's; it and RLIMIT_AS (address space, not memory: it refuses programs that reserve
much and use little) are the fallbacks where no group can be made.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from planrun.errors import ConfigurationError
from planrun.policy import Ceilings, LevelPolicy

BWRAP_ENV = "PLANRUN_BWRAP"
DEFAULT_BWRAP = "/usr/bin/bwrap"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_ID = "65534"  # "nobody": no capabilities, and not root inside the namespace
DEFAULT_PROCESSES = 256
DEFAULT_FILE_MB = 1024
MIB = 1024 * 1024
PROBE_TIMEOUT_S = 10.0
#: Linked into /usr on merged-/usr systems, bound read-only otherwise.
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What programs need of /etc: user and group names (id, git, ssh), the dynamic linker's
#: cache, the time zone, and Debian's alternatives (/usr/bin/awk links through them).
ETC_ALWAYS = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "localtime", "alternatives")
#: Only with the network: name resolution and TLS certificates.
ETC_NETWORK = ("resolv.conf", "hosts", "host.conf", "gai.conf", "services", "protocols",
               "ssl", "ca-certificates")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one step's program; 0 means no limit."""

    #: From the plan's ``memory_mb`` and the policy's ``memory_mb`` ceiling: the step's
    #: memory cgroup's limit, else RLIMIT_AS.
    memory_bytes: int = 0
    #: RLIMIT_CPU: SIGXCPU at this many seconds, SIGKILL a second later.
    cpu_seconds: int = 0
    #: RLIMIT_FSIZE: a write beyond it fails (EFBIG) or raises SIGXFSZ.
    file_bytes: int = 0
    #: Processes of the program and all its descendants together (the pids cgroup, else
    #: RLIMIT_NPROC).
    processes: int = 0

    @property
    def any(self) -> bool:
        return bool(self.memory_bytes or self.cpu_seconds or self.file_bytes or self.processes)


def _lowest(*values: int | None) -> int:
    given = [value for value in values if value]
    return min(given) if given else 0


def step_limits(memory_mb: int | None, cpu_seconds: int | None, ceilings: Ceilings, *,
                sandboxed: bool) -> Limits:
    """The limits of one step: the lower of the plan's value and the policy's ceiling;
    a sandboxed program also gets the process and file-size limits (defaults 256, 1 GiB)."""
    memory = _lowest(memory_mb, ceilings.memory_mb) * MIB
    cpu = _lowest(cpu_seconds, ceilings.cpu_seconds)
    if not sandboxed:
        return Limits(memory_bytes=memory, cpu_seconds=cpu)
    return Limits(memory_bytes=memory, cpu_seconds=cpu,
                  file_bytes=(ceilings.file_mb or DEFAULT_FILE_MB) * MIB,
                  processes=ceilings.processes or DEFAULT_PROCESSES)


# -- bubblewrap -----------------------------------------------------------------------------

def bwrap_path() -> str:
    """The bubblewrap binary: ``$PLANRUN_BWRAP`` if set (tests point it at nothing)."""
    return os.environ.get(BWRAP_ENV, "").strip() or DEFAULT_BWRAP


def _system_arguments() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for path in SYSTEM_LINKS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def _etc_arguments(network: bool) -> list[str]:
    names = ETC_ALWAYS + (ETC_NETWORK if network else ())
    return [arg for name in names for arg in ("--ro-bind-try", f"/etc/{name}", f"/etc/{name}")]


def _bind_arguments(binds: list[str]) -> list[str]:
    args = []
    for bind in binds:
        path, writable = (bind[:-3], True) if bind.endswith(":rw") else (bind, False)
        if not os.path.isabs(path) or not os.path.exists(path):
            raise ConfigurationError(
                f"shell.run: the policy binds {bind!r} into the sandbox, but "
                f"{'it does not exist' if os.path.isabs(path) else 'it is not absolute'}",
                hint="fix 'binds' in the policy file (docs/sandbox.md): absolute paths "
                     "that exist, with ':rw' to bind one writable")
        args += ["--bind" if writable else "--ro-bind", path, path]
    return args


def _core_arguments(network: bool) -> list[str]:
    args = ["--unshare-all", "--unshare-user", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID,
            "--die-with-parent", "--new-session", "--clearenv"]
    return args + (["--share-net"] if network else []) + _system_arguments()


def bwrap_options(*, workspace: Path, cwd: Path, env: dict[str, str], policy: LevelPolicy
                  ) -> list[str]:
    """bubblewrap's options for one step (the command comes after them and ``--``).

    Given to bubblewrap through a file descriptor (``--args``), not its command line, so
    that the step's environment is not shown to every user of the machine by ``ps``.
    """
    network = policy.sandbox_network
    args = _core_arguments(network) + _etc_arguments(network) + _bind_arguments(policy.binds)
    args += ["--bind", str(workspace), str(workspace), "--remount-ro", "/", "--chdir", str(cwd)]
    for name, value in sandbox_env(workspace, env).items():
        args += ["--setenv", name, value]
    return args


def sandbox_env(workspace: Path, extra: dict[str, str]) -> dict[str, str]:
    """PATH, HOME (the workspace), LANG of planrun if set, then the step's ``env``."""
    env = {"PATH": DEFAULT_PATH, "HOME": str(workspace)}
    if "LANG" in os.environ:
        env["LANG"] = os.environ["LANG"]
    return env | extra


# -- is it there? ---------------------------------------------------------------------------

_PROBED: dict[str, str | None] = {}
_PROBE_LOCK = threading.Lock()


def sandbox_problem() -> str | None:
    """Why bubblewrap cannot start a sandbox here, or None if it can.

    Tried once per process and bubblewrap binary (a real sandbox running ``true``).
    """
    path = bwrap_path()
    with _PROBE_LOCK:
        if path not in _PROBED:
            _PROBED[path] = _probe(path)
        return _PROBED[path]


def probed() -> bool:
    """Whether ``sandbox_problem`` would answer without starting a process."""
    return bwrap_path() in _PROBED


def _probe(path: str) -> str | None:
    if not os.access(path, os.X_OK):
        return f"{path} is not installed"
    try:
        done = subprocess.run([path, *_core_arguments(False), "--", "true"], env={},
                              capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path} could not run: {exc}"
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{path} could not create a sandbox: {said[-1] if said else done.returncode}"
    return None
