"""One client's stream: replay, then live messages, with a heartbeat whenever it is idle.

Messages come in batches: whatever is queued for the client when it gets its turn, so a
client that fell a little behind catches up with one write instead of one per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from planrun.contract.stream import Message, heartbeat
from planrun.progress_bridge.hub import Disconnected, Subscription
from planrun.progress_bridge.store import MessageStore

#: The most messages in one batch; after a full batch the client lets the other clients
#: and the upstream have a turn (a queue that is never empty would never let them run).
BATCH = 64


async def follow(sub: Subscription, store: MessageStore, after: int, heartbeat_s: float,
                 direct: Callable[[list[Message]], bool] | None = None
                 ) -> AsyncGenerator[list[Message], None]:
    """The run's stored messages with seq > ``after``, then live ones, in batches, with no
    gap and no duplicate; a heartbeat (a batch of one) after every ``heartbeat_s`` seconds
    without a message.

    ``sub`` must be subscribed before this starts: whatever is committed after the replay
    query is then already queued, and live messages already replayed are dropped by seq.
    Raises :class:`~progress_bridge.hub.Disconnected` when the hub cuts the client off
    (after the messages queued before the cut).

    With ``direct`` (a non-blocking write of a batch: False when it cannot take it now),
    live messages that find the client caught up skip the queue: the hub hands them to
    ``direct`` (as ``sub.sink``), and only what it refuses comes back through here.
    """
    stored = await store.after(sub.run_id, after)
    last = stored[-1].seq if stored else after
    for start in range(0, len(stored), BATCH):
        yield stored[start:start + BATCH]
        await asyncio.sleep(0)
    del stored  # a long-lived stream keeps no copy of its replay

    sink = None
    if direct is not None:
        write = direct

        def sink(messages: list[Message]) -> bool:
            nonlocal last
            fresh = messages if messages[0].seq > last else [m for m in messages
                                                             if m.seq > last]
            if fresh and not write(fresh):
                return False
            last = max(last, messages[-1].seq)
            return True

    try:
        while True:
            if sink is not None and sub.empty:
                sub.sink = sink  # the hub clears it when ``direct`` refuses
            first = await sub.get(timeout=heartbeat_s)
            if first is None:
                yield [heartbeat(sub.run_id, last)]
                continue
            batch: list[Message] = []
            cut: Disconnected | None = None
            message: Message | None = first
            while message is not None:
                if message.seq > last:
                    last = message.seq
                    batch.append(message)
                if len(batch) == BATCH:
                    break
                try:
                    message = sub.get_nowait()
                except Disconnected as exc:
                    cut = exc
                    break
            if batch:
                yield batch
            if cut is not None:
                raise cut
            if len(batch) == BATCH:
                await asyncio.sleep(0)
    finally:
        sub.sink = None
