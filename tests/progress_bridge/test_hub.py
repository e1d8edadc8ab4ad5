"""Fan-out: bounded queues, slow subscribers cut off, replay joined to live without a seam."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from planrun.contract.stream import Message
from planrun.progress_bridge.follow import follow
from planrun.progress_bridge.hub import TOO_SLOW, Disconnected, Hub, Subscription
from planrun.progress_bridge.store import MessageStore

from .clients import draft
from .conftest import fed_upstream
from .events import nth


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
        async with fed_upstream(tmp_path, hub=hub) as (state, source):
            store = state.store
            for i in range(1, 51):
                await source.push(nth("r", i))
            sub = hub.subscribe("r")
            stream = follow(sub, store, 10, heartbeat_s=60)
            more = asyncio.ensure_future(
                asyncio.gather(*(source.push(nth("r", i)) for i in range(51, 101))))
            got = []
            async with asyncio.timeout(10):
                async for batch in stream:
                    got.extend(message.seq for message in batch)
                    if got[-1] == 100:
                        break
            await more
            await stream.aclose()
            assert got == list(range(11, 101))

    asyncio.run(main())


def test_concurrently_delivered_events_keep_a_run_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        hub = Hub()
        async with fed_upstream(tmp_path, hub=hub) as (_state, source):
            sub = hub.subscribe("r")
            await asyncio.gather(*(source.push(nth("r", i)) for i in range(1, 51)))
            assert [m.seq for m in [sub.get_nowait() for _ in range(50)] if m] == list(range(1, 51))
            assert await sub.get(timeout=0.01) is None

    asyncio.run(main())


def test_a_caught_up_client_gets_a_turns_messages_in_one_call_and_a_refusal_queues_them(
) -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("r")
        calls: list[list[int]] = []
        accept = True

        def sink(messages: list[Message]) -> bool:
            calls.append([m.seq for m in messages])
            return accept

        sub.sink = sink
        for seq in (1, 2, 3):
            assert hub.publish(draft(seq).numbered("r", seq)) == 1
        assert calls == [] and sub.empty  # handed over when the loop turn ends, not queued
        await asyncio.sleep(0)
        assert calls == [[1, 2, 3]]
        accept = False
        hub.publish(draft(4).numbered("r", 4))
        await asyncio.sleep(0)
        assert calls[-1] == [4] and sub.sink is None  # refused: back to the queue
        hub.publish(draft(5).numbered("r", 5))
        assert [m.seq for m in [sub.get_nowait() for _ in range(2)] if m] == [4, 5]

    asyncio.run(main())


def test_a_stream_hands_live_messages_to_its_writer_once_caught_up(tmp_path: Path) -> None:
    """Replay through the stream, then live messages straight to ``direct``; a heartbeat
    carries the last seq written either way; a refusal sends the rest through the stream."""

    async def main() -> None:
        store = MessageStore(tmp_path)
        hub = Hub()
        written: list[int] = []
        room = True

        def direct(messages: list[Message]) -> bool:
            if room:
                written.extend(m.seq for m in messages)
            return room

        try:
            sub = hub.subscribe("r")
            stream = follow(sub, store, 0, heartbeat_s=0.2, direct=direct)
            hub.publish(draft(1).numbered("r", 1))
            async with asyncio.timeout(5):
                assert [m.seq for m in await anext(stream)] == [1]
                waiting = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0)
                assert sub.sink is not None  # caught up: live messages skip the queue
                for seq in (2, 3):
                    hub.publish(draft(seq).numbered("r", seq))
                beat = await waiting
                assert written == [2, 3]
                assert beat[0].type == "heartbeat" and beat[0].seq == 3
                room = False
                hub.publish(draft(4).numbered("r", 4))
                assert [m.seq for m in await anext(stream)] == [4]
            await stream.aclose()
            assert sub.sink is None
        finally:
            store.close()

    asyncio.run(main())
