"""Where the bridge's events come from: one small interface, and an in-memory fake beside
it (the real one, Prefect's event stream reconciled from its REST API, is
``progress_bridge.prefect_source``).

A source calls ``deliver`` with each event it reads, live or read again after a
(re)connect; ``deliver`` says whether the event was new (committed now). Events already
committed are skipped by the caller, so a source may deliver an event more than once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from planrun.contract.breakers import BreakerChange
from planrun.progress_bridge.apply import BreakerChanged, FlowRunEnded, RunEvent

Incoming = RunEvent | FlowRunEnded | BreakerChanged
Deliver = Callable[[Incoming], bool]
#: The time of the newest event the bridge committed (epoch s), None before the first.
Cursor = Callable[[], float | None]


class EventSource(Protocol):
    #: Set while the source is following (subscribed and reconciled).
    connected: asyncio.Event

    async def prepare(self) -> None:
        """Make ready what following needs, without holding up the loop (the bridge
        serves its clients meanwhile)."""
        ...

    async def follow(self, deliver: Deliver, cursor: Cursor) -> None:
        """Deliver every event from now on, and the ones since ``cursor`` missed while
        away; runs until cancelled."""
        ...

    async def reconcile(self) -> int:
        """Deliver again the events since the bridge's cursor; how many were new."""
        ...

    async def recall(self, run_id: str) -> int:
        """Deliver every event of the run ``run_id`` (one the bridge has not followed);
        how many were new."""
        ...

    async def breakers(self) -> list[BreakerChange]:
        """The state of every breaker now (empty when it cannot be read)."""
        ...


class FakeEventSource:
    """Events a test hands in, on the bridge's loop: :meth:`push` delivers one at once,
    :meth:`reconcile` delivers every event pushed so far again (:meth:`recall`, those of one
    run), those kept with :meth:`store` too; ``known_breakers`` are the breakers' state
    the bridge reads as it starts."""

    def __init__(self, known_breakers: list[BreakerChange] | None = None) -> None:
        self.connected = asyncio.Event()
        self.pushed: list[Incoming] = []
        self.known_breakers = list(known_breakers or [])
        self.recalled: list[str] = []  # the runs asked for with :meth:`recall`
        self.reconciled = 0  # how many times :meth:`reconcile` was called
        self._deliver: Deliver | None = None
        self._stop: asyncio.Event | None = None

    async def prepare(self) -> None:
        return None

    async def follow(self, deliver: Deliver, cursor: Cursor) -> None:
        self._deliver = deliver
        self._stop = asyncio.Event()
        self.connected.set()
        try:
            await self._stop.wait()  # until cancelled
        finally:
            self.connected.clear()

    async def push(self, event: Incoming) -> bool:
        """Deliver ``event`` now; whether it was new."""
        await self.connected.wait()
        assert self._deliver is not None
        self.pushed.append(event)
        return self._deliver(event)

    def store(self, event: Incoming) -> None:
        """Keep ``event`` for the reads only: one Prefect stored but the stream dropped
        (a subscriber that fell behind)."""
        self.pushed.append(event)

    async def reconcile(self) -> int:
        assert self._deliver is not None
        self.reconciled += 1
        return sum(self._deliver(event) for event in list(self.pushed))

    async def recall(self, run_id: str) -> int:
        assert self._deliver is not None
        self.recalled.append(run_id)
        return sum(self._deliver(event) for event in list(self.pushed)
                   if getattr(event, "run_id", None) == run_id)

    async def breakers(self) -> list[BreakerChange]:
        return list(self.known_breakers)
