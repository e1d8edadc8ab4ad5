"""A run's ``max_parallel`` slots, which a step lends back while it waits for a limit.

A step holds one of its run's slots from the moment it may start until it ends. While it
waits for a tool's slot, a rate limit or the machine's load (``flows.limits``) it runs
nothing, so it lends its slot to the run's next step ("a waiting step holds nothing
else"). When its wait is over it takes a slot back before any step that has not started
yet: it already holds what it waited for (a tool's slot), which should not sit idle behind
steps that may themselves wait for it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RunSlots:
    """``size`` slots; each held by a step id."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._back: deque[asyncio.Future[None]] = deque()  # steps taking theirs back
        self._new: deque[asyncio.Future[None]] = deque()  # steps about to start
        self._held: set[str] = set()

    @asynccontextmanager
    async def hold(self, step_id: str) -> AsyncIterator[None]:
        """A slot for ``step_id`` during the body (unless lent when the body ends)."""
        await self._take(self._new)
        self._held.add(step_id)
        try:
            yield
        finally:
            if step_id in self._held:
                self._held.discard(step_id)
                self._give()

    def lend(self, step_id: str) -> None:
        """``step_id`` waits for something else: its slot goes to the next step."""
        if step_id in self._held:
            self._held.discard(step_id)
            self._give()

    async def take_back(self, step_id: str) -> None:
        """``step_id``'s slot again (if lent), before any step that has not started."""
        if step_id not in self._held:
            await self._take(self._back)
            self._held.add(step_id)

    async def _take(self, queue: deque[asyncio.Future[None]]) -> None:
        if self._free > 0 and not self._back and (queue is self._back or not self._new):
            self._free -= 1
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._give()  # handed over just as it was cancelled: pass it on
            elif handed in queue:
                queue.remove(handed)
            raise

    def _give(self) -> None:
        for queue in (self._back, self._new):
            while queue:
                handed = queue.popleft()
                if not handed.done():
                    handed.set_result(None)
                    return
        self._free += 1
