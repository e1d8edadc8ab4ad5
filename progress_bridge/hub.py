"""Fan-out: each published message goes to every subscriber of its run through one
bounded queue per client.

``publish`` never waits: a subscriber whose queue is full is cut off (its reader gets
:class:`Disconnected` after what is queued, and its ``closed`` event is set at once) so
one slow client never slows the others; it can come back with ``after=<last seq it saw>``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from planrun.contract.stream import Message

TOO_SLOW: Final = "too slow: resume with ?after=<last seq>"
# WebSocket close codes that go with a cut-off; SSE streams just end.
TOO_SLOW_CODE: Final = 4408
GOING_AWAY_CODE: Final = 1001


class Disconnected(Exception):
    """The hub cut this subscriber off; ``reason`` says why, ``code`` is the close code."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Subscription:
    """One client's place in the hub: its bounded queue and whether it was cut off."""

    def __init__(self, run_id: str, size: int) -> None:
        self.run_id = run_id
        self.size = size
        self._items: deque[Message] = deque()
        self._ready = asyncio.Event()  # set while there is something to take (or closed)
        self.closed = asyncio.Event()
        #: Set by whoever serves the subscription once its client has been told the end
        #: (a WebSocket's close frame sent, an SSE stream ended).
        self.finished = asyncio.Event()
        self.reason: str | None = None
        self.code = GOING_AWAY_CODE
        #: Set (by its sender) while the client is caught up: the hub hands it each loop
        #: turn's messages directly instead of queueing them and waking the sender. False
        #: from the sink (the client's socket is full) clears it and queues them instead.
        self.sink: Callable[[list[Message]], bool] | None = None

    @property
    def empty(self) -> bool:
        """Nothing queued."""
        return not self._items

    def offer(self, message: Message) -> bool:
        """Queue ``message``; False (and nothing queued) when the queue is full."""
        if self.closed.is_set() or len(self._items) >= self.size:
            return False
        self._items.append(message)
        self._ready.set()
        return True

    def close(self, reason: str, code: int = GOING_AWAY_CODE) -> None:
        """Cut this subscriber off; its reader gets :class:`Disconnected` after what's queued."""
        if self.closed.is_set():
            return
        self.reason, self.code = reason, code
        self.closed.set()
        self._ready.set()

    def get_nowait(self) -> Message | None:
        """The next queued message, None when there is none; :class:`Disconnected` once
        cut off and drained."""
        if self._items:
            return self._items.popleft()
        if self.closed.is_set():
            raise Disconnected(self.reason or "closed", self.code)
        self._ready.clear()
        return None

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting at most ``timeout`` seconds (then None)."""
        while (message := self.get_nowait()) is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return message


class Hub:
    """Subscribers per run; ``queue_size`` bounds each client's queue.

    Listeners added with :meth:`on_slow` hear of every client cut off for being slow.
    """

    def __init__(self, queue_size: int = 1000) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._slow_listeners: list[Callable[[Subscription], None]] = []
        self._subs: dict[str, set[Subscription]] = {}
        self._direct: dict[Subscription, list[Message]] = {}  # for sinks, until the turn ends

    def on_slow(self, listener: Callable[[Subscription], None]) -> None:
        """Call ``listener`` with each subscription cut off for being slow."""
        self._slow_listeners.append(listener)

    def subscribe(self, run_id: str) -> Subscription:
        """A new subscription to the run's live messages, from now on."""
        sub = Subscription(run_id, self.queue_size)
        self._subs.setdefault(run_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub``; safe to call more than once."""
        subs = self._subs.get(sub.run_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.run_id]

    def subscribers(self, run_id: str | None = None) -> int:
        """How many clients follow ``run_id`` (every run when None)."""
        if run_id is not None:
            return len(self._subs.get(run_id, ()))
        return sum(len(s) for s in self._subs.values())

    def publish(self, message: Message) -> int:
        """Offer ``message`` to every subscriber of its run without waiting; returns how
        many took it. Subscribers whose queue is full are cut off. Subscribers with a sink
        get the messages of this loop turn together, once it ends."""
        delivered = 0
        direct = self._direct
        for sub in list(self._subs.get(message.run_id, ())):
            if sub.sink is not None:
                if not direct:
                    asyncio.get_running_loop().call_soon(self._flush)
                direct.setdefault(sub, []).append(message)
                delivered += 1
            elif sub.offer(message):
                delivered += 1
            else:
                self._cut_off(sub)
        return delivered

    def _flush(self) -> None:
        direct, self._direct = self._direct, {}
        for sub, messages in direct.items():
            if sub.sink is not None and sub.sink(messages):
                continue
            # Its socket is full (or it is leaving): its sender takes over from the queue,
            # these first. Nothing was queued for it meanwhile: only this clears a sink.
            sub.sink = None
            for message in messages:
                if not sub.offer(message):
                    if not sub.closed.is_set():
                        self._cut_off(sub)
                    break

    def close_all(self, reason: str = "the bridge is stopping") -> list[Subscription]:
        """Cut every subscriber off (the ones cut). Call it before stopping the server:
        WebSockets close with 1001 and SSE streams end at once instead of holding up the
        shutdown."""
        cut = []
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close(reason)
                self.unsubscribe(sub)
                cut.append(sub)
        return cut

    async def close_all_and_wait(self, reason: str, timeout_s: float) -> None:
        """``close_all``, then wait (up to ``timeout_s``) until every client was told."""
        waits = [asyncio.ensure_future(sub.finished.wait()) for sub in self.close_all(reason)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for wait in pending:
                wait.cancel()

    def _cut_off(self, sub: Subscription) -> None:
        sub.close(TOO_SLOW, TOO_SLOW_CODE)
        self.unsubscribe(sub)
        for listener in self._slow_listeners:
            listener(sub)
