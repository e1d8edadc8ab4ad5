"""One client's stream: replay, then live messages, with a heartbeat whenever it is idle."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from progress_bridge.hub import Subscription
from progress_bridge.messages import Message, heartbeat
from progress_bridge.store import MessageStore


async def follow(sub: Subscription, store: MessageStore, after: int,
                 heartbeat_s: float) -> AsyncGenerator[Message, None]:
    """The run's stored messages with seq > ``after``, then live ones, with no gap and no
    duplicate; a heartbeat after every ``heartbeat_s`` seconds without a message.

    ``sub`` must be subscribed before this starts: whatever is committed after the replay
    query is then already queued, and live messages already replayed are dropped by seq.
    Raises :class:`~progress_bridge.hub.Disconnected` when the hub cuts the client off.
    """
    last = after
    for message in await store.after(sub.run_id, after):
        last = message.seq
        yield message
    while True:
        live = await sub.get(timeout=heartbeat_s)
        if live is None:
            yield heartbeat(sub.run_id, last)
        elif live.seq > last:
            last = live.seq
            yield live
