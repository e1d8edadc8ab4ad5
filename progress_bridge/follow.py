"""One client's stream: replay, then live messages, with a heartbeat whenever it is idle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from planrun.contract.stream import Message, heartbeat
from planrun.progress_bridge.hub import Subscription
from planrun.progress_bridge.store import MessageStore

#: Messages sent to one client before it lets the other clients and the upstream have a turn
#: (sending does not wait when the socket's buffer has room).
TURN = 16


async def follow(sub: Subscription, store: MessageStore, after: int,
                 heartbeat_s: float) -> AsyncGenerator[Message, None]:
    """The run's stored messages with seq > ``after``, then live ones, with no gap and no
    duplicate; a heartbeat after every ``heartbeat_s`` seconds without a message.

    ``sub`` must be subscribed before this starts: whatever is committed after the replay
    query is then already queued, and live messages already replayed are dropped by seq.
    Raises :class:`~progress_bridge.hub.Disconnected` when the hub cuts the client off.
    """
    last = after
    for count, message in enumerate(await store.after(sub.run_id, after), 1):
        last = message.seq
        yield message
        if count % TURN == 0:
            await asyncio.sleep(0)
    in_a_row = 0
    while True:
        live = await sub.get(timeout=heartbeat_s)
        if live is None:
            yield heartbeat(sub.run_id, last)
        elif live.seq > last:
            last = live.seq
            yield live
        in_a_row += 1
        if in_a_row % TURN == 0:  # a queue that is never empty would never let others run
            await asyncio.sleep(0)
