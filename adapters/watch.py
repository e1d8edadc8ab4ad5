"""Watching one step's running program: its CPU priority lowered once it has run a while,
its whole tree stopped at its CPU limit or once the kernel killed part of it at its
memory limit (cgroup v1 kills one process, the largest: the rest would go on without
it), its memory sampled where no control group counts it, and at the end what it used
(docs/resources.md).

Every ``shell.run`` program still running after ``NICE_AFTER_S`` is reniced to ``NICE``
with all its descendants, and its control group's CPU weight is lowered to nice 10's:
short commands (``git status``, ``ls``) finish before that and are never slowed, long
builds and batch jobs give way to everything interactive. Renicing is repeated on each
look, so a process forked while the tree was being walked is caught on the next one.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import suppress

import psutil

from planrun.adapters.cgroups import StepGroup
from planrun.adapters.launcher import Usage
from planrun.contract.records import Resources

NICE_AFTER_S = 1.0
NICE = 10
#: How often the tree is looked at: often where memory is sampled or CPU is limited, else
#: often enough to end a tree soon after the kernel killed one of it at the memory limit.
SAMPLE_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 0.25


class TreeWatch:
    """Watches the tree under the launcher ``pid`` (in ``group`` where there is one)."""

    def __init__(self, pid: int, group: StepGroup | None, cpu_limit_s: int = 0) -> None:
        self.pid = pid
        self.group = group
        #: Enforced on the whole tree where a group counts its CPU; RLIMIT_CPU (per
        #: process) is set either way.
        self.cpu_limit_s = cpu_limit_s if group is not None else 0
        self.sampling = group is None or "memory" not in group.dirs
        #: The largest sum of the tree's resident sets seen (sampling only).
        self.sampled_peak = 0
        #: The tree was stopped for going over its CPU limit.
        self.cpu_exceeded = False
        self.lowered = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Look at the tree every interval until ``stop``: a timer on the running loop, not
        a task, so that starting and stopping it costs the step no pass of the loop."""
        loop, started = asyncio.get_running_loop(), time.monotonic()
        interval = SAMPLE_INTERVAL_S if self.sampling or self.cpu_limit_s else IDLE_INTERVAL_S

        def tick() -> None:
            self._timer = loop.call_later(interval, tick)
            self.look(time.monotonic() - started)

        self._timer = loop.call_later(interval, tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def look(self, elapsed: float) -> None:
        """One look at the tree, ``elapsed`` seconds after its start."""
        pids = self.tree()
        if self.sampling:
            self.sampled_peak = max(self.sampled_peak, _resident(pids))
        if elapsed >= NICE_AFTER_S:
            renice(pids)
            if self.group is not None and not self.lowered:
                self.lowered = self.group.lower_weight()
        if self.group is None:
            return
        if self.group.memory_limited and self.group.oom_kills():
            self.group.kill()  # the kernel killed one process at the limit: end the tree
        if self.cpu_limit_s:
            used = self.group.cpu_s()
            if used is not None and used >= self.cpu_limit_s:
                self.cpu_exceeded = True
                self.group.kill()

    def tree(self) -> list[int]:
        """The program and its descendants (not the launcher, which only waits)."""
        if self.group is not None:
            return self.group.pids()
        try:
            return [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def memory_killed(self) -> bool:
        """Whether the kernel killed part of the tree at the group's memory limit."""
        return self.group is not None and self.group.oom_kills() > 0

    def measured(self, usage: Usage | None) -> Resources:
        """What the tree used: the group's counts where there is one, else the launcher's
        (the reaped tree) and the samples."""
        group = self.group
        peak = group.peak_memory() if group is not None else None
        if peak is None:
            peak = max(self.sampled_peak, usage.maxrss_bytes if usage else 0)
        cpu = group.cpu_s() if group is not None else None
        if cpu is None:
            cpu = usage.cpu_s if usage else 0.0
        written = usage.written_bytes if usage and usage.written_bytes is not None else 0
        return Resources(peak_memory_bytes=peak, cpu_s=round(cpu, 3), written_bytes=written)


def renice(pids: list[int], nice: int = NICE) -> None:
    """Lower the CPU priority of ``pids`` to ``nice`` (never raise it)."""
    for pid in pids:
        with suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, pid) < nice:
                os.setpriority(os.PRIO_PROCESS, pid, nice)


def _resident(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total
