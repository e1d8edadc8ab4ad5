"""What each step used, as the engine measures it, and the memory watchdog of in-process
tools (docs/resources.md).

A step whose tool runs a program (``shell.run``) is measured by the tool itself: the
program's whole process tree (``adapters/watch.py``), exactly where control groups can be
made. A step whose work happens in this process (``http.request``, ``file.*``,
``core.*``) shares the process with every other step and with the engine, so only an
approximation is possible, and this is it:

- CPU: the process's CPU time while the step ran, split evenly between the in-process
  steps running at each moment, so that their CPU seconds add up to the process's;
- peak memory: the process's resident set, the highest seen while the step ran (read as
  it starts and ends, and sampled every ``SAMPLE_INTERVAL_S`` in between);
- written: what the tool counted itself (the file tools count the bytes they write).

A memory limit on an in-process step is watched: once the process's resident set has
grown by more than the limit since the step started, the step's task is cancelled, which
takes effect at its next ``await``, and the step fails with a resource error. Growth is
the process's, not the step's: where several in-process steps run at once, each one with a
limit below the growth is stopped, and a step that never awaits cannot be stopped.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from types import TracebackType

import psutil

from planrun.adapters.usage import StepUsage
from planrun.contract.records import Resources
from planrun.errors import ResourceError

MIB = 1024 * 1024
SAMPLE_INTERVAL_S = 0.05
#: A sampler with nothing to sample waits this long for a next step before it ends.
IDLE_S = 2.0


#: libc's ``pread``, called with the GIL held (``ctypes.PyDLL``): ``os.pread`` lets the GIL
#: go, and on the engine's loop getting it back from Prefect's busy threads took ≈ 0.4 ms
#: a read, against ≈ 2 µs for the read itself (BENCHMARKS.md, section 1).
_PREAD = ctypes.PyDLL(None).pread
_PREAD.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)
_PREAD.restype = ctypes.c_ssize_t


class Resident:
    """This process's resident set in bytes, read from ``/proc/self/statm`` through a file
    kept open (≈ 2 µs a read, against ≈ 40 µs through psutil, which is the fallback)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.pid = -1
        self.fd: int | None = None
        self.buffer = ctypes.create_string_buffer(128)

    def __call__(self) -> int:
        if self.pid != os.getpid():  # first use, or a forked child: its own file
            self.pid = os.getpid()
            try:
                self.fd = os.open(f"/proc/{self.pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None
        if self.fd is None:
            return int(psutil.Process().memory_info().rss)
        read = _PREAD(self.fd, self.buffer, len(self.buffer), 0)
        if read <= 0:
            return int(psutil.Process().memory_info().rss)
        return int(self.buffer.raw[:read].split()[1]) * self.page


class Meter:
    """One tool call of one step: what it used, and whether the watchdog stopped it."""

    def __init__(self, metering: Metering, in_process: bool, limit_bytes: int | None) -> None:
        self.metering = metering
        self.in_process = in_process
        self.limit_bytes = limit_bytes if in_process else None
        self.task: asyncio.Task[object] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.baseline = 0
        self.peak = 0
        self.cpu_s = 0.0
        self.share_at_start = 0.0
        self.active = False
        #: How far the process had grown when the watchdog stopped the step; None: it did not.
        self.stopped_at: int | None = None

    def __enter__(self) -> Meter:
        if self.limit_bytes is not None:
            self.task = asyncio.current_task()
            self.loop = asyncio.get_running_loop()
        self.metering.started(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.metering.stopped(self)

    def sampled(self, resident: int) -> None:
        """Called by the sampler (another thread) with the process's resident set."""
        self.peak = max(self.peak, resident)
        limit = self.limit_bytes
        if limit is not None and self.stopped_at is None and resident - self.baseline > limit:
            self.stopped_at = resident - self.baseline
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        if self.active and self.task is not None:
            self.task.cancel("over its memory limit")
        else:
            self.stopped_at = None  # the step ended first: it stays as it ended

    def stopped_error(self, tool: str) -> ResourceError:
        """The error of a step the watchdog stopped."""
        limit_mb = (self.limit_bytes or 0) // MIB
        grown_mb = (self.stopped_at or 0) // MIB
        return ResourceError(
            f"{tool}: stopped at its memory limit of {limit_mb} MiB: planrun's process grew "
            f"by {grown_mb} MiB while the step ran",
            hint="raise the step's memory_mb (or the plan's limits.memory_mb), or ask the "
                 "tool for less (smaller pages, fewer results); docs/resources.md says how "
                 "in-process tools are measured")

    def resources(self, usage: StepUsage) -> Resources:
        """What the call used: its programs' trees where it ran any, else this process's
        share; plus the bytes the tool wrote itself."""
        if usage.programs is not None:
            ran = usage.programs
            return Resources(peak_memory_bytes=ran.peak_memory_bytes, cpu_s=ran.cpu_s,
                             written_bytes=ran.written_bytes + usage.written_bytes)
        return Resources(peak_memory_bytes=self.peak, cpu_s=round(self.cpu_s, 3),
                         written_bytes=usage.written_bytes)


class Metering:
    """The meters of this process's steps: the CPU split and the sampler they share.

    ``clock`` is the process's CPU clock and ``resident`` its resident set (injected by
    the tests); the sampler is a thread, so that it reads the process while the event
    loop is busy, and it ends once no step has needed it for ``IDLE_S``.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S,
                 clock: Callable[[], float] = time.process_time,
                 resident: Callable[[], int] | None = None) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.resident = resident or Resident()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._active: set[Meter] = set()
        self._in_process = 0
        self._share = 0.0
        self._cpu_last = clock()
        self._sampler: threading.Thread | None = None

    def meter(self, *, in_process: bool, memory_mb: int | None = None) -> Meter:
        """A meter for one tool call (enter it around the call)."""
        return Meter(self, in_process, memory_mb * MIB if memory_mb else None)

    def started(self, meter: Meter) -> None:
        resident = self.resident()
        with self._lock:
            self._advance()
            meter.baseline = meter.peak = resident
            meter.share_at_start = self._share
            meter.active = True
            self._active.add(meter)
            self._in_process += meter.in_process
            if self._sampler is None:
                self._sampler = threading.Thread(target=self._sample, daemon=True,
                                                 name="planrun-metering")
                self._sampler.start()
            self._wake.notify()

    def stopped(self, meter: Meter) -> None:
        resident = self.resident()
        with self._lock:
            self._advance()
            meter.active = False
            self._active.discard(meter)
            self._in_process -= meter.in_process
            meter.peak = max(meter.peak, resident)
            meter.cpu_s = self._share - meter.share_at_start if meter.in_process else 0.0

    def _advance(self) -> None:
        """Split the CPU the process used since the last change among the in-process
        steps that ran through it (held under the lock)."""
        now = self.clock()
        if self._in_process:
            self._share += (now - self._cpu_last) / self._in_process
        self._cpu_last = now

    def _sample(self) -> None:
        idle_since: float | None = None
        while True:
            with self._lock:
                if not self._active:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= IDLE_S:
                        self._sampler = None
                        return
                    self._wake.wait(IDLE_S)
                    continue
                idle_since = None
                meters = list(self._active)
            resident = self.resident()
            for meter in meters:
                meter.sampled(resident)
            time.sleep(self.interval_s)


@lru_cache(maxsize=1)
def default_metering() -> Metering:
    """This process's metering (one CPU split and one sampler for all its runs)."""
    return Metering()
