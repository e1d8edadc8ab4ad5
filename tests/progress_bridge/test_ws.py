"""The WebSocket route against a real bridge under uvicorn, with real `websockets` clients."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .clients import receive_until, seqs
from .conftest import BridgeFactory, ServedBridge, wait_for


def client(url: str, **options: object) -> connect:
    return connect(url, proxy=None, open_timeout=5, **options)  # type: ignore[arg-type]


async def closed_with(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    """Read until the server closes; the close code and reason."""
    async with asyncio.timeout(timeout):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
    rcvd = closed.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


def test_live_messages_reach_every_client(bridge: ServedBridge) -> None:
    async def main() -> None:
        async with client(bridge.ws_url("r1")) as a, client(bridge.ws_url("r1")) as b, \
                client(bridge.ws_url("other")) as c:
            wait_for(lambda: bridge.hub.subscribers() == 3, 5, "three subscribers")
            sent = [await bridge.emit("r1", i) for i in range(1, 6)]
            await bridge.emit("other", 1)
            got_a, got_b = await receive_until(a, 5), await receive_until(b, 5)
            assert [json.dumps(m, separators=(",", ":")) for m in got_a] == [m.wire for m in sent]
            assert seqs(got_b) == [1, 2, 3, 4, 5]
            other = await receive_until(c, 1)
            assert other[0]["run_id"] == "other"

    asyncio.run(main())


def test_after_replays_then_streams_live(bridge: ServedBridge) -> None:
    async def main() -> None:
        for i in range(1, 11):
            await bridge.emit("r", i)
        async with client(bridge.ws_url("r", after=7)) as ws:
            assert seqs(await receive_until(ws, 10)) == [8, 9, 10]
            await bridge.emit("r", 11)
            assert seqs(await receive_until(ws, 11)) == [11]

    asyncio.run(main())


def test_reconnecting_with_the_last_seq_misses_nothing_and_repeats_nothing(
        bridge: ServedBridge) -> None:
    total = 400

    async def publish() -> None:
        for i in range(1, total + 1):
            await bridge.emit("r", i)
            if i % 10 == 0:
                await asyncio.sleep(0.002)

    async def main() -> None:
        publishing = asyncio.ensure_future(publish())
        seen: list[int] = []
        while not seen or seen[-1] < total:
            after = seen[-1] if seen else None
            async with client(bridge.ws_url("r", after=after)) as ws:
                # Leave mid-stream after a few messages, while publishing goes on.
                for _ in range(37):
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message["type"] != "heartbeat":
                        seen.append(message["seq"])
                    if seen and seen[-1] == total:
                        break
        await publishing
        assert seen == list(range(1, total + 1))

    asyncio.run(main())


def test_a_bridge_restart_keeps_numbering_and_replays(bridge_factory: BridgeFactory,
                                                      tmp_path: Path) -> None:
    async def main() -> None:
        first = bridge_factory(tmp_path)
        seen: list[int] = []
        async with client(first.ws_url("r")) as ws:
            wait_for(lambda: first.hub.subscribers("r") == 1, 5, "the client")
            for i in range(1, 21):
                await first.emit("r", i)
            seen += seqs(await receive_until(ws, 12))[:12]
            await asyncio.to_thread(first.stop)
            assert await closed_with(ws) == (1001, "the bridge is stopping")
        second = bridge_factory(tmp_path)
        assert second.store.last_seq("r") == 20
        async with client(second.ws_url("r", after=seen[-1])) as ws:
            more = asyncio.ensure_future(
                asyncio.gather(*(second.emit("r", i) for i in range(21, 31))))
            seen += seqs(await receive_until(ws, 30))
            assert [m.seq for m in await more] == list(range(21, 31))
        assert seen == list(range(1, 31))

    asyncio.run(main())


def test_a_slow_client_is_cut_off_and_never_slows_a_fast_one(
        bridge_factory: BridgeFactory) -> None:
    # Bursts (16 at once) stay under the queue size, as the upstream's do under 1,000.
    bridge = bridge_factory(queue_size=32)
    cut: list[str | None] = []
    bridge.hub.on_slow(lambda sub: cut.append(sub.reason))

    async def main() -> None:
        # The slow client never reads: its library stops reading the socket after one
        # frame, the kernel buffers fill, the bridge cannot write and the queue fills.
        async with client(bridge.ws_url("r"), max_queue=1, compression=None) as slow, \
                client(bridge.ws_url("r")) as fast:
            wait_for(lambda: bridge.hub.subscribers("r") == 2, 5, "two subscribers")
            fast_seen: list[int] = []

            async def read_fast() -> None:
                while True:
                    message = json.loads(await fast.recv())
                    if message["type"] != "heartbeat":
                        fast_seen.append(message["seq"])

            reader = asyncio.ensure_future(read_fast())
            published = 0
            try:
                async with asyncio.timeout(60):
                    while not cut:
                        batch = range(published + 1, published + 17)
                        await asyncio.gather(*(bridge.emit("r", i, summary_bytes=8000)
                                               for i in batch))
                        published += 16
                        # A fast client keeps up with the publisher (here the test's loop
                        # shares one process and GIL with the bridge, so pace the bursts).
                        while len(fast_seen) < published and not reader.done():
                            await asyncio.sleep(0.001)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            assert fast_seen == list(range(1, published + 1)), (reader.exception() if not reader.cancelled() else "cancelled", cut, published)
            assert cut == ["too slow: resume with ?after=<last seq>"]

            slow_seen: list[int] = []
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(30):
                    while True:
                        slow_seen.append(json.loads(await slow.recv())["seq"])
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4408
            assert "after=" in closed.value.rcvd.reason
            assert slow_seen == list(range(1, len(slow_seen) + 1))
            assert len(slow_seen) < published

        async with client(bridge.ws_url("r", after=slow_seen[-1])) as again:
            rest = seqs(await receive_until(again, published))
            assert slow_seen + rest == list(range(1, published + 1))

    asyncio.run(main())
    metrics = bridge.app.state.bridge.metrics.render().decode()
    assert "planrun_bridge_slow_disconnects_total 1.0" in metrics


def test_a_token_is_required(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(token="s3cret")

    async def main() -> None:
        for url, headers in ((bridge.ws_url("r", token=""), None),
                             (bridge.ws_url("r", token="wrong"), None),
                             (bridge.ws_url("r", token=""), {"Authorization": "Bearer nope"})):
            async with client(url, additional_headers=headers) as ws:
                assert await closed_with(ws) == (1008, "missing or wrong bearer token")
        async with client(bridge.ws_url("r", token="s3cret")) as by_query, \
                client(bridge.ws_url("r", token=""),
                       additional_headers={"Authorization": "Bearer s3cret"}) \
                as by_header:
            wait_for(lambda: bridge.hub.subscribers("r") == 2, 5, "two subscribers")
            await bridge.emit("r", 1)
            assert seqs(await receive_until(by_query, 1)) == [1]
            assert seqs(await receive_until(by_header, 1)) == [1]

    asyncio.run(main())


def test_a_foreign_origin_is_refused(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(allowed_origins=["http://ui.example"])

    async def main() -> None:
        async with client(bridge.ws_url("r"), origin="http://evil.example") as ws:
            assert await closed_with(ws) == (1008, "origin not allowed")
        own = f"http://127.0.0.1:{bridge.port}"
        async with client(bridge.ws_url("r"), origin=own) as same_host, \
                client(bridge.ws_url("r"), origin="http://ui.example") as allowed:
            wait_for(lambda: bridge.hub.subscribers("r") == 2, 5, "two subscribers")
            await bridge.emit("r", 1)
            assert seqs(await receive_until(same_host, 1)) == [1]
            assert seqs(await receive_until(allowed, 1)) == [1]

    asyncio.run(main())


@pytest.mark.parametrize(("frame", "code"), [
    ("this is not json", 1003),
    (b"\x00\x01binary", 1003),
    ("[" + "1," * 500_000 + "1]", 1009),
])
def test_garbage_closes_only_that_connection(bridge: ServedBridge, frame: str | bytes,
                                             code: int) -> None:
    async def main() -> None:
        async with client(bridge.ws_url("r")) as bad, client(bridge.ws_url("r")) as good:
            wait_for(lambda: bridge.hub.subscribers("r") == 2, 5, "two subscribers")
            await good.send(json.dumps({"type": "ping"}))  # small JSON: read and ignored
            await bad.send(frame)
            assert (await closed_with(bad))[0] == code
            wait_for(lambda: bridge.hub.subscribers("r") == 1, 5, "the bad client gone")
            await bridge.emit("r", 1)
            assert seqs(await receive_until(good, 1)) == [1]

    asyncio.run(main())


def test_heartbeats_arrive_while_nothing_happens(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(heartbeat_s=0.2)

    async def main() -> None:
        await bridge.emit("r", 1)
        async with client(bridge.ws_url("r")) as ws:
            assert seqs(await receive_until(ws, 1)) == [1]
            async with asyncio.timeout(3):
                beat = json.loads(await ws.recv())
            assert beat["type"] == "heartbeat" and beat["seq"] == 1 and beat["run_id"] == "r"

    asyncio.run(main())


