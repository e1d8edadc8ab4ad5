"""Control groups for one step's programs: exact accounting of the whole process tree, a
memory limit that kills the tree, a process limit and a CPU weight (docs/resources.md).

A step gets a group of its own in each controller planrun can use, below planrun's own
group (``<own>/planrun/<id>``), and its program joins them all before it execs
(``adapters/launcher.py``), so every descendant is counted, even one that left the
process group, and nothing it does can leave. cgroup v1 (one hierarchy per controller,
``/sys/fs/cgroup/<controller>``) and v2 (one directory for every controller, where
planrun's group delegates them) are both read; v1 is what the machine this was built on
has. Where no group can be made (not root, no delegation) every method here answers
None and the callers fall back to rlimits and sampling.

A step's group is made ahead, with the launcher that will start its program already in
it (``adapters/warm.py``): the first move of a process into a group waits for the kernel
(an RCU grace period under cgroup v1). A group is used once (its counters start at
zero).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
#: Where the hierarchies are mounted, if not ROOT (tests point it at nothing, to take the
#: path of a machine without control groups).
ROOT_ENV = "PLANRUN_CGROUP_ROOT"
FOLDER = "planrun"
#: memory: peak and limit; cpuacct: CPU time; cpu: weight; pids: the process limit.
CONTROLLERS = ("memory", "cpuacct", "cpu", "pids")
#: bubblewrap's own two processes (outside and PID 1) count in the pids limit.
BWRAP_PROCESSES = 2
#: What a long-running step's group weighs: nice 10's weight against nice 0's 1024 (the
#: kernel's sched_prio_to_weight); v2's cpu.weight is the same ratio of its 100.
LOW_SHARES = 110
LOW_WEIGHT = 11

#: The file of each reading, per cgroup version: controller, file name.
_V1 = {"peak": ("memory", "memory.max_usage_in_bytes"),
       "limit": ("memory", "memory.limit_in_bytes"), "oom": ("memory", "memory.oom_control"),
       "cpu": ("cpuacct", "cpuacct.usage"), "weight": ("cpu", "cpu.shares"),
       "pids": ("pids", "pids.max")}
_V2 = {"peak": ("memory", "memory.peak"), "limit": ("memory", "memory.max"),
       "oom": ("memory", "memory.events"), "cpu": ("cpu", "cpu.stat"),
       "weight": ("cpu", "cpu.weight"), "pids": ("pids", "pids.max")}


@dataclass(frozen=True)
class StepGroup:
    """One step's control groups: ``dirs`` by controller (under v2, one directory for all).
    ``memory_limited``: the group itself enforces the step's memory limit."""

    dirs: Mapping[str, Path]
    v2: bool = False
    memory_limited: bool = False

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the program writes its PID to, one per directory."""
        return sorted({str(path / "cgroup.procs") for path in self.dirs.values()})

    def pids(self) -> list[int]:
        """The processes in the group now: the program and every descendant."""
        for path in self.dirs.values():
            with suppress(OSError, ValueError):
                return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
        return []

    def peak_memory(self) -> int | None:
        """The most memory the tree held at once (resident and the page cache it caused)."""
        text = self._read("peak")
        return int(text) if text is not None and text.isdigit() else None

    def cpu_s(self) -> float | None:
        """CPU seconds, user and system, of every process that was in the group."""
        text = self._read("cpu")
        if text is None:
            return None
        if not self.v2:
            return int(text) / 1e9
        fields = dict(line.split() for line in text.splitlines() if " " in line)
        return int(fields["usage_usec"]) / 1e6 if "usage_usec" in fields else None

    def oom_kills(self) -> int:
        """How many of the tree's processes the kernel killed at the memory limit."""
        text = self._read("oom") or ""
        fields = dict(line.split() for line in text.splitlines() if " " in line)
        return int(fields.get("oom_kill", 0))

    def lower_weight(self) -> bool:
        """Weigh the step's CPU as a nice-10 process does (a long-running step)."""
        return self._write("weight", str(LOW_WEIGHT if self.v2 else LOW_SHARES))

    def kill(self) -> None:
        """SIGKILL every process in the group (the step went over its CPU limit)."""
        for pid in self.pids():
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, within: float = 2.0) -> bool:
        """Kill what is still inside and remove every directory; False if one stayed busy."""
        return all([remove_cgroup(path, within) for path in set(self.dirs.values())])

    def _file(self, reading: str) -> Path | None:
        controller, name = (_V2 if self.v2 else _V1)[reading]
        path = self.dirs.get(controller)
        return path / name if path is not None else None

    def _read(self, reading: str) -> str | None:
        path = self._file(reading)
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def _write(self, reading: str, value: str) -> bool:
        path = self._file(reading)
        if path is None:
            return False
        try:
            path.write_text(value)
        except OSError:
            return False
        return True


def make_step_group(memory_bytes: int = 0, processes: int = 0) -> StepGroup | None:
    """A new group for one step, limited to ``memory_bytes`` and ``processes`` (plus
    bubblewrap's own) where given; None where no group can be made here."""
    made = _make_dirs()
    if made is None:
        return None
    group = limit(StepGroup(*made), memory_bytes, processes)
    if group is None:
        StepGroup(*made).remove(within=0)
    return group


def limit(group: StepGroup, memory_bytes: int = 0, processes: int = 0) -> StepGroup | None:
    """``group`` limited to ``memory_bytes`` and ``processes`` (plus bubblewrap's own) where
    given; None where it has a pids controller whose limit cannot be set (the caller
    removes it, and falls back to RLIMIT_NPROC). Without that controller, RLIMIT_NPROC
    limits the processes (adapters/shell.py)."""
    if processes > 0 and "pids" in group.dirs and \
            not group._write("pids", str(processes + BWRAP_PROCESSES)):
        return None
    if memory_bytes > 0 and _limit_memory(group, memory_bytes):
        return StepGroup(group.dirs, group.v2, memory_limited=True)
    return group


def _make_dirs() -> tuple[dict[str, Path], bool] | None:
    """A new group's directory in every controller planrun can use, and whether it is v2."""
    bases, v2 = own_groups()
    token = secrets.token_hex(6)
    dirs: dict[str, Path] = {}
    for controller, base in bases.items():
        made = _make(base, token)
        if made is not None:
            dirs[controller] = made
    if not dirs:
        return None
    if v2:
        dirs = {c: p for c, p in dirs.items() if c in _v2_controllers(p)}
    return dirs, v2


def own_groups() -> tuple[dict[str, Path], bool]:
    """planrun's own group directory per controller (v1), or its one v2 directory for
    every controller; and whether it is v2. Empty where nothing is mounted. Read once per
    process and root (``ROOT_ENV``): a process stays in the groups it started in."""
    bases, v2 = _own_groups(os.getpid(), os.environ.get(ROOT_ENV, "").strip() or str(ROOT))
    return dict(bases), v2


@lru_cache(maxsize=8)
def _own_groups(pid: int, root_text: str) -> tuple[tuple[tuple[str, Path], ...], bool]:
    found, v2 = _read_own_groups(Path(root_text))
    return tuple(found.items()), v2


def _read_own_groups(root: Path) -> tuple[dict[str, Path], bool]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}, False
    found: dict[str, Path] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller in CONTROLLERS and (root / controller).is_dir():
                found[controller] = root / controller / path.lstrip("/")
    if found:
        return found, False
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None or not (root / "cgroup.controllers").exists():
        return {}, False
    base = root / unified.lstrip("/")
    return dict.fromkeys(("memory", "cpu", "pids"), base), True


def _make(base: Path, token: str) -> Path | None:
    """``base/planrun/token``, made; None if it cannot be."""
    folder = base / FOLDER
    try:
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            _delegate(folder)
        group = folder / token
        group.mkdir(exist_ok=True)
    except OSError:
        return None
    return group


def _delegate(folder: Path) -> None:
    """v2: hand the controllers on to the steps' groups (no-op and harmless under v1)."""
    control = folder / "cgroup.subtree_control"
    if control.exists():
        with suppress(OSError):
            control.write_text("+memory +cpu +pids")
    shares = folder / "cpu.shares"  # v1: the folder weighs as one busy process per CPU
    if shares.exists():
        with suppress(OSError):
            shares.write_text(str(1024 * (os.cpu_count() or 1)))


def _v2_controllers(path: Path) -> set[str]:
    try:
        return set((path / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _limit_memory(group: StepGroup, memory_bytes: int) -> bool:
    """Set the memory limit (and, where swap is counted, memory plus swap to the same, so
    the tree is killed rather than swapped out; under v2 the whole group is killed)."""
    if not group._write("limit", str(memory_bytes)):
        return False
    memory = group.dirs.get("memory")
    if memory is not None:
        swap = memory / ("memory.swap.max" if group.v2 else "memory.memsw.limit_in_bytes")
        if swap.exists():
            with suppress(OSError):
                swap.write_text("0" if group.v2 else str(memory_bytes))
        if group.v2:  # the kernel kills the whole group at once (v1: adapters/watch.py)
            with suppress(OSError):
                (memory / "memory.oom.group").write_text("1")
    return True


def remove_cgroup(group: Path, within: float = 2.0) -> bool:
    """Kill whatever is still in ``group``, then remove it; False if it stayed busy."""
    deadline = time.monotonic() + within
    while True:
        with suppress(OSError, ValueError):
            for pid in (group / "cgroup.procs").read_text().split():
                with suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(0.01)
