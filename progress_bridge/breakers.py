"""What the bridge knows of the tools' circuit breakers: the latest state of each, from
the breakers' events and, at start-up, from the Prefect Variables that hold them.

Events can come late or twice (a reconciliation reads the last minutes again), so a change
counts only if it is not older than the one known (:attr:`BreakerChange.order`: epoch,
then open → half-open → closed). The board feeds ``/metrics`` and tells a run that starts
while a breaker of one of its tools is open (docs/stream.md, ``tool.circuit_opened``).
"""

from __future__ import annotations

from planrun.contract.breakers import BreakerChange

#: The gauge ``planrun_breaker_state`` of each state.
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class BreakerBoard:
    """The latest known change of every breaker, by key."""

    def __init__(self) -> None:
        self.latest: dict[str, BreakerChange] = {}

    def update(self, change: BreakerChange) -> bool:
        """Keep ``change`` unless a later one is known; whether it is the latest now (a
        change that came again, to runs that may not have heard it, still is)."""
        known = self.latest.get(change.key)
        if known is not None and known.order > change.order:
            return False
        if known is None or known.order < change.order or change.message is not None:
            self.latest[change.key] = change  # an event's message beats a Variable's silence
        return True

    def not_closed(self) -> list[BreakerChange]:
        """The breakers open or half-open now, by key."""
        return [c for _, c in sorted(self.latest.items()) if c.state != "closed"]
