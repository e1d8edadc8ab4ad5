"""Number, store, then fan out one message at a time.

The upstream does not call this: it commits an event's messages together with the run's
view and the event's id (``MessageStore.commit``) and publishes them itself
(``PrefectUpstream._commit`` in ``progress_bridge/upstream.py``). :class:`Publisher` is how the
transport tests (WebSocket, SSE, hub) feed the store and the hub directly.
"""

from __future__ import annotations

from progress_bridge.hub import Hub
from progress_bridge.messages import Draft, Message
from progress_bridge.metrics import Metrics
from progress_bridge.store import MessageStore


class Publisher:
    """Turns drafts into numbered, stored, delivered messages, one at a time.

    Call :meth:`emit` from the bridge's event loop. A message is published only after it
    is committed, which is what makes replay gap-free; numbering, storing and publishing
    happen with no await in between, so concurrent callers cannot reorder a run's messages.
    """

    def __init__(self, store: MessageStore, hub: Hub, metrics: Metrics | None = None) -> None:
        self.store = store
        self.hub = hub
        self.metrics = metrics

    async def emit(self, run_id: str, draft: Draft) -> Message:
        """Store ``draft`` as the run's next message and deliver it to the run's clients.

        Raises :class:`~progress_bridge.store.StoreError` when the log cannot be written;
        nothing is delivered then. (Asynchronous so that writes may move off the loop
        later without changing the upstream.)
        """
        message = self.store.append(run_id, draft)
        self.hub.publish(message)
        if self.metrics is not None:
            self.metrics.observe(message)
        return message

    def last_seq(self, run_id: str) -> int:
        """The seq of the run's last stored message, 0 when none."""
        return self.store.last_seq(run_id)
