"""Whether the bridge takes another run now (docs/http-api.md, "When the bridge is busy").

``POST /v1/runs`` answers ``503`` with ``Retry-After`` when the queue is full, that is
when ``max_queued`` of the runs this bridge submitted have not started yet (their engine
has not announced them: Prefect has them scheduled or pending), or when the machine uses
more than ``max_memory_percent`` of its memory. The queue's Retry-After is how long the
runs ahead take to start at the rate runs started in the last minute, from 1 to 60 s; the
memory's is a fixed guess (no one can say when memory frees up).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psutil

#: ``PLANRUN_MAX_QUEUED``: runs submitted and not started yet beyond which submissions wait.
DEFAULT_MAX_QUEUED = 50
#: ``PLANRUN_MAX_MEMORY_PERCENT``: the machine's memory in use above which they wait.
DEFAULT_MAX_MEMORY_PERCENT = 90.0
RETRY_MIN_S, RETRY_MAX_S = 1, 60
MEMORY_RETRY_S = 30
#: How far back the start rate is measured.
RATE_WINDOW_S = 60.0
#: How long one reading of the machine's memory is used (psutil costs ≈ 20 µs, but the
#: route may be hit hundreds of times a second under load).
MEMORY_TTL_S = 1.0


@dataclass(frozen=True)
class Refusal:
    """Why a submission waits, for a person (``detail``) and a program (the rest)."""

    reason: str
    detail: str
    retry_after_s: int

    def body(self) -> dict[str, object]:
        return {"detail": self.detail, "reason": self.reason,
                "retry_after_s": self.retry_after_s}


class Admission:
    """The limits of one bridge, and the start times that estimate its queue's pace."""

    def __init__(self, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_memory_percent: float = DEFAULT_MAX_MEMORY_PERCENT, *,
                 memory_percent: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if max_queued < 0 or not 0 <= max_memory_percent <= 100:
            raise ValueError("max_queued must be 0 or more and max_memory_percent 0 to 100")
        self.max_queued = max_queued
        self.max_memory_percent = max_memory_percent
        self.clock = clock
        self._read_memory = memory_percent or _memory_percent
        self._memory: tuple[float, float] | None = None  # (monotonic time, percent)
        self._starts: deque[float] = deque()
        #: Submissions being validated and started now (they count as queued).
        self.submitting = 0

    @classmethod
    def from_env(cls) -> Admission:
        """The limits ``PLANRUN_MAX_QUEUED`` and ``PLANRUN_MAX_MEMORY_PERCENT`` say, else
        the defaults; a value that is not a number is an error naming the variable."""
        values = {}
        for name, default in (("PLANRUN_MAX_QUEUED", DEFAULT_MAX_QUEUED),
                              ("PLANRUN_MAX_MEMORY_PERCENT", DEFAULT_MAX_MEMORY_PERCENT)):
            text = os.environ.get(name, "").strip()
            try:
                values[name] = type(default)(text) if text else default
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number (default "
                                 f"{default})") from None
        return cls(int(values["PLANRUN_MAX_QUEUED"]),
                   float(values["PLANRUN_MAX_MEMORY_PERCENT"]))

    def started(self, at: float) -> None:
        """A submitted run started at ``at`` (epoch s): the queue's pace."""
        self._starts.append(at)
        self._forget(at)

    def refusal(self, queued: int) -> Refusal | None:
        """Why a run submitted now must wait, with ``queued`` runs not started yet; None
        when it may go ahead."""
        memory = self.memory_percent()
        if memory > self.max_memory_percent:
            return Refusal("memory", f"the machine is short of memory: {memory:.0f} % in use "
                           f"(the limit is {self.max_memory_percent:g} %); try again in "
                           f"{MEMORY_RETRY_S} s", MEMORY_RETRY_S)
        if queued < self.max_queued:
            return None
        wait = self._queue_wait(queued)
        return Refusal("queue_full", f"the queue is full: {queued} run(s) wait to start (the "
                       f"limit is {self.max_queued}); try again in {wait} s", wait)

    def memory_percent(self) -> float:
        """The machine's memory in use, read at most every ``MEMORY_TTL_S``."""
        now = time.monotonic()
        if self._memory is None or now - self._memory[0] >= MEMORY_TTL_S:
            self._memory = (now, self._read_memory())
        return self._memory[1]

    def _queue_wait(self, queued: int) -> int:
        """Seconds until a place is free at the last minute's start rate (1 to 60)."""
        now = self.clock()
        self._forget(now)
        ahead = queued - self.max_queued + 1
        per_s = len(self._starts) / RATE_WINDOW_S
        wait = ahead / per_s if per_s else RETRY_MAX_S
        return max(RETRY_MIN_S, min(RETRY_MAX_S, math.ceil(wait)))

    def _forget(self, now: float) -> None:
        while self._starts and now - self._starts[0] > RATE_WINDOW_S:
            self._starts.popleft()


def _memory_percent() -> float:
    return float(psutil.virtual_memory().percent)
