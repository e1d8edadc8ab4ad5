"""Whether the machine is under pressure: memory in use and CPU load over thresholds
(docs/limits.md, "Load").

Cheap on purpose: a step about to start asks ``pressure()``, which samples at most every
``SAMPLE_S`` and otherwise answers from the last sample. Memory is psutil's
``virtual_memory().percent``. CPU load is the number of runnable processes per core,
averaged over the samples of the last ``window_s`` seconds (``procs_running`` of
``/proc/stat``, this process not counted): a load average of seconds rather than the
kernel's minute, so that a burst of work is seen while it lasts and forgotten soon after.
Where ``/proc/stat`` does not exist, the kernel's one-minute load average stands in.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

import psutil

from planrun.policy_limits import LoadLimits

#: How often the machine is looked at, at most.
SAMPLE_S = 0.5


def runnable() -> float:
    """Processes running or ready to run now, this one left out."""
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"procs_running "):
                    return max(float(line.split()[1]) - 1, 0.0)
    except OSError:
        pass
    return os.getloadavg()[0]


class LoadGauge:
    """The machine's load against the thresholds ``settings()`` gives."""

    def __init__(self, settings: Callable[[], LoadLimits], *,
                 memory: Callable[[], float] = lambda: psutil.virtual_memory().percent,
                 cpu: Callable[[], float] = runnable,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.memory = memory
        self.cpu = cpu
        self.clock = clock
        self.cores = psutil.cpu_count() or 1
        self._memory_percent = 0.0
        self._runnable: deque[tuple[float, float]] = deque()
        self._sampled = -SAMPLE_S

    def pressure(self) -> str | None:
        """Which threshold the machine is over now, in words; None when it is not."""
        limits = self.settings()
        if limits.memory_percent is None and limits.cpu_per_core is None:
            return None
        self._sample(limits)
        if limits.memory_percent is not None and self._memory_percent >= limits.memory_percent:
            return (f"memory in use {self._memory_percent:.0f} % ≥ "
                    f"{limits.memory_percent:g} %")
        if limits.cpu_per_core is not None and self._runnable:
            load = sum(v for _, v in self._runnable) / len(self._runnable) / self.cores
            if load > limits.cpu_per_core:
                return (f"CPU load {load:.1f} per core over {limits.window_s:g} s > "
                        f"{limits.cpu_per_core:g}")
        return None

    def _sample(self, limits: LoadLimits) -> None:
        now = self.clock()
        if now - self._sampled < SAMPLE_S:
            return
        self._sampled = now
        if limits.memory_percent is not None:
            self._memory_percent = self.memory()
        if limits.cpu_per_core is not None:
            self._runnable.append((now, self.cpu()))
            while self._runnable and self._runnable[0][0] < now - limits.window_s:
                self._runnable.popleft()
