"""A circuit breaker's state as it crosses from the engine to the bridge (docs/policy.md,
"Circuit breakers"; docs/stream.md, ``tool.circuit_*``).

The engine publishes each change of a breaker as the Prefect event
``planrun.tool.circuit_opened|half_open|closed`` about the resource ``planrun.tool.<key>``,
its payload the breaker's view and a ``message`` for a person; it keeps the view itself in
a Prefect Variable named ``planrun-breaker-…`` (the same fields, no message). Both read as
a :class:`BreakerChange`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from planrun.contract.version import Versioned

EVENT_PREFIX = "planrun.tool.circuit_"
RESOURCE_PREFIX = "planrun.tool."
#: Every breaker Variable's name starts with this (its failures and claims too).
VARIABLE_PREFIX = "planrun-breaker-"
BreakerState = Literal["closed", "open", "half_open"]
#: The state each event announces.
EVENT_STATES: dict[str, BreakerState] = {f"{EVENT_PREFIX}opened": "open",
                                         f"{EVENT_PREFIX}half_open": "half_open",
                                         f"{EVENT_PREFIX}closed": "closed"}
#: Within one epoch a breaker opens, lets a trial through, then closes (or a new epoch opens).
_RANK = {"open": 0, "half_open": 1, "closed": 2}


class BreakerChange(Versioned):
    """One breaker's view: ``key`` is its tool, or ``http.request@host[:port]``; ``epoch``
    counts its openings' claims; ``failures`` in ``window_s`` opened it; ``probe_at``
    (epoch s) is when an open breaker lets its trial call through."""

    key: str
    state: BreakerState = "closed"
    epoch: int = 0
    failures: int = 0
    window_s: float = 0.0
    probe_at: float | None = None
    opened_at: float | None = None
    run_id: str | None = None
    opened_total: int = 0
    threshold: int | None = None
    cooldown_s: float | None = None
    message: str | None = None

    @property
    def tool(self) -> str:
        """The tool whose steps the breaker stops (``http.request`` for a host's breaker)."""
        return self.key.partition("@")[0]

    @property
    def order(self) -> tuple[int, int]:
        """Later changes of a breaker sort after earlier ones, whatever order they came in."""
        return self.epoch, _RANK[self.state]

    def note(self, now: float) -> str:
        """What a person reads about the breaker at ``now``: the engine's message, unless
        the time it names for the next try has passed."""
        if self.state == "open":
            failing = (f"{self.key} is failing in every run "
                       f"({self.failures} in {self.window_s:g} s)")
            if self.probe_at is not None and self.probe_at <= now:
                return f"{failing}; its next call is a trial"
            if self.message:
                return self.message
            if self.probe_at is None:
                return f"{failing}; it tries again after a cool-down"
            at = datetime.fromtimestamp(self.probe_at).strftime("%H:%M:%S")
            return f"{failing}; the next try is at {at}"
        if self.message:
            return self.message
        if self.state == "half_open":
            return f"{self.key}: one trial call goes through"
        return f"{self.key} works again"
