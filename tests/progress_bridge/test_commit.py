"""The one commit path: a failed commit leaves the old view, and the same event delivered
again is applied again (not dropped as a duplicate), so no message is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from planrun.contract.status import StepStatus
from planrun.contract.stream import Draft, Message
from planrun.progress_bridge.flow_runs import FakeFlowRuns
from planrun.progress_bridge.hub import Hub
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.source import FakeEventSource
from planrun.progress_bridge.state import BridgeState, Settings
from planrun.progress_bridge.store import MessageStore, StoreError
from planrun.progress_bridge.upstream import Upstream

from .conftest import QUIET
from .events import started, step_done


class FailingOnce(MessageStore):
    """A real store whose next commit fails once ``fail`` is set (a full disk, say)."""

    fail = False

    def commit(self, run_id: str, drafts: list[Draft], state: str | None = None, *,
               event_id: str | None = None, occurred: float | None = None) -> list[Message]:
        if self.fail:
            self.fail = False
            raise StoreError("disk full")
        return super().commit(run_id, drafts, state, event_id=event_id, occurred=occurred)


def test_a_failed_commit_keeps_the_old_view_and_the_event_is_applied_again_later(
        tmp_path: Path) -> None:
    async def main() -> None:
        store, hub, source = FailingOnce(tmp_path), Hub(), FakeEventSource()
        state = BridgeState(store, hub, Metrics(), ControlService(FakeFlowRuns()),
                            Settings(token="t"))
        task = asyncio.ensure_future(Upstream(source, QUIET)(state))
        sub = hub.subscribe("r")
        try:
            assert await source.push(started("r"))
            before = state.views["r"]
            store.fail = True
            done = step_done("r", 2)
            assert not await source.push(done)  # the commit failed
            assert state.views["r"] is before  # the old view stays
            assert before.record.steps["s2"].status == StepStatus.PENDING
            assert not store.seen(done.id) and store.last_seq("r") == 1

            assert await source.reconcile() == 1  # the same event again: applied this time
            after = state.views["r"]
            assert after.record.steps["s2"].status == StepStatus.COMPLETED
            assert store.seen(done.id)
            got = [sub.get_nowait() for _ in range(2)]
            assert [(m.seq, m.type, m.step_id) for m in got if m] == [
                (1, "run.started", None), (2, "step.completed", "s2")]
            assert await source.reconcile() == 0  # and only once
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            store.close()

    asyncio.run(main())
