"""Fan-out: bounded queues, slow subscribers cut off, replay joined to live without a seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from planrun.progress_bridge.flow_runs import FakeFlowRuns
from planrun.progress_bridge.follow import follow
from planrun.progress_bridge.hub import TOO_SLOW, Disconnected, Hub, Subscription
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.source import FakeEventSource
from planrun.progress_bridge.state import BridgeState, Settings
from planrun.progress_bridge.store import MessageStore
from planrun.progress_bridge.upstream import Upstream

from .clients import draft
from .conftest import QUIET
from .events import nth


@asynccontextmanager
async def upstream_of(directory: Path, hub: Hub) -> AsyncIterator[
        tuple[FakeEventSource, MessageStore]]:
    """The production upstream over a store in ``directory`` and ``hub``, fed by the fake
    source it yields with the store."""
    store, source = MessageStore(directory), FakeEventSource()
    state = BridgeState(store, hub, Metrics(), ControlService(FakeFlowRuns()),
                        Settings(token="t"))
    task = asyncio.ensure_future(Upstream(source, QUIET)(state))
    await source.connected.wait()
    try:
        yield source, store
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


def test_a_full_queue_cuts_that_subscriber_off_and_no_other() -> None:
    async def main() -> None:
        hub = Hub(queue_size=3)
        cut: list[Subscription] = []
        hub.on_slow(cut.append)
        slow, fast = hub.subscribe("r"), hub.subscribe("r")
        other_run = hub.subscribe("q")
        got = []
        for seq in range(1, 6):
            hub.publish(draft(seq).numbered("r", seq))
            message = await fast.get()
            assert message is not None
            got.append(message.seq)
        assert got == [1, 2, 3, 4, 5]
        assert cut == [slow] and slow.reason == TOO_SLOW and slow.closed.is_set()
        assert [m.seq for m in [slow.get_nowait() for _ in range(3)] if m] == [1, 2, 3]
        with pytest.raises(Disconnected, match="too slow") as cut_off:
            await slow.get()
        assert cut_off.value.code == 4408
        assert hub.subscribers("r") == 1 and hub.subscribers() == 2
        assert not other_run.closed.is_set()

    asyncio.run(main())


def test_replay_then_live_has_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    """Messages committed while the replay query runs arrive once, in order."""

    async def main() -> None:
        hub = Hub()
        async with upstream_of(tmp_path, hub) as (source, store):
            for i in range(1, 51):
                await source.push(nth("r", i))
            sub = hub.subscribe("r")
            stream = follow(sub, store, 10, heartbeat_s=60)
            more = asyncio.ensure_future(
                asyncio.gather(*(source.push(nth("r", i)) for i in range(51, 101))))
            got = []
            async with asyncio.timeout(10):
                async for message in stream:
                    got.append(message.seq)
                    if message.seq == 100:
                        break
            await more
            await stream.aclose()
            assert got == list(range(11, 101))

    asyncio.run(main())


def test_concurrently_delivered_events_keep_a_run_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        async with upstream_of(tmp_path, hub) as (source, _store):
            sub = hub.subscribe("r")
            await asyncio.gather(*(source.push(nth("r", i)) for i in range(1, 51)))
            assert [m.seq for m in [sub.get_nowait() for _ in range(50)] if m] == list(range(1, 51))
            assert await sub.get(timeout=0.01) is None

    asyncio.run(main())
