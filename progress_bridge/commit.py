"""The one commit path of the bridge: a run's new view and its messages are stored in one
transaction, then the view is swapped in and the messages are fanned out.

Nothing is published before it is committed, which makes replay gap-free; when the store
fails (:class:`~progress_bridge.store.StoreError`) the old view stays and the event is
not marked seen, so the same event applied again later makes the same messages.
"""

from __future__ import annotations

import logging
import time

from planrun.contract.stream import Draft, Message
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.state import BridgeState
from planrun.progress_bridge.store import StoreError

log = logging.getLogger("planrun.bridge")


class Committer:
    """Commits for one bridge: its store, its views, its hub and its metrics."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state
        #: When each run last sent a message (monotonic s): the ticker's quiet rule.
        self.last_sent: dict[str, float] = {}

    def commit(self, run_id: str, view: RunView, drafts: list[Draft], *, save: bool = True,
               event_id: str | None = None, occurred: float | None = None) -> bool:
        """Store ``drafts`` as the run's next messages with ``view`` (unless not ``save``)
        and the event as seen; then swap the view in and publish. False, and nothing
        changed, when the store fails."""
        state = self.state
        try:
            sent = state.store.commit(run_id, drafts, view.to_json() if save else None,
                                      event_id=event_id, occurred=occurred)
        except StoreError as exc:
            log.error("cannot store the messages of run %s: %s", run_id, exc)
            return False
        state.views[run_id] = view
        self._publish(run_id, sent)
        return True

    def _publish(self, run_id: str, sent: list[Message]) -> None:
        if sent:
            self.last_sent[run_id] = time.monotonic()
        for message in sent:
            self.state.hub.publish(message)
            self.state.metrics.observe(message)
