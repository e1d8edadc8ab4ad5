"""The SSE route against a real bridge under uvicorn, read over HTTP with httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from websockets.asyncio.client import connect

from .clients import read_sse_until, receive_until, sse_events
from .conftest import BridgeFactory, ServedBridge, wait_for


def test_events_stream_live_with_ids_and_types(bridge: ServedBridge) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=10) as http, \
                http.stream("GET", "/v1/runs/r/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            wait_for(lambda: bridge.hub.subscribers("r") == 1, 5, "the SSE client")
            sent = [await bridge.emit("r", i) for i in range(1, 4)]
            events = await read_sse_until(response, 3)
        wait_for(lambda: bridge.hub.subscribers("r") == 0, 5, "the SSE client to be forgotten")
        assert [(e["id"], e["event"]) for e in events] == [
            ("1", "run.started"), ("2", "step.completed"), ("3", "step.completed")]
        assert [e["data"] for e in events] == [m.wire for m in sent]

    asyncio.run(main())


def test_last_event_id_and_after_resume(bridge: ServedBridge) -> None:
    async def main() -> None:
        for i in range(1, 8):
            await bridge.emit("r", i)
        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=10) as http:
            async with http.stream("GET", "/v1/runs/r/events",
                                   headers={"Last-Event-ID": "5"}) as response:
                assert [e["id"] for e in await read_sse_until(response, 7)] == ["6", "7"]
            async with http.stream("GET", "/v1/runs/r/events?after=6") as response:
                await bridge.emit("r", 8)
                assert [e["id"] for e in await read_sse_until(response, 8)] == ["7", "8"]

    asyncio.run(main())


def test_http_without_the_token_is_401(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(token="s3cret")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=bridge.http, timeout=10) as http:
            refused = await http.get("/v1/runs/r/events")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            wrong = await http.get("/v1/runs/r/events",
                                   headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert (await http.get("/healthz")).status_code == 200
            await bridge.emit("r", 1)
            for url, headers in (("/v1/runs/r/events", {"Authorization": "Bearer s3cret"}),
                                 ("/v1/runs/r/events?token=s3cret", {})):
                async with http.stream("GET", url, headers=headers) as response:
                    assert response.status_code == 200
                    assert [e["id"] for e in await read_sse_until(response, 1)] == ["1"]

    asyncio.run(main())


def test_heartbeat_events_arrive_while_nothing_happens(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(heartbeat_s=0.2)

    async def main() -> None:
        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=10) as http, \
                http.stream("GET", "/v1/runs/r/events") as response:
            async with asyncio.timeout(3):
                async for event in sse_events(response):
                    if event.get("event") == "heartbeat":
                        break
        assert "id" not in event
        assert json.loads(event["data"])["type"] == "heartbeat"

    asyncio.run(main())


def test_stopping_the_bridge_ends_open_streams(bridge: ServedBridge) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=10) as http, \
                http.stream("GET", "/v1/runs/r/events") as response:
            wait_for(lambda: bridge.hub.subscribers("r") == 1, 5, "the SSE client")
            started = time.monotonic()
            await asyncio.to_thread(bridge.stop)
            assert time.monotonic() - started < 5
            async with asyncio.timeout(5):
                assert [e async for e in sse_events(response) if "id" in e] == []

    asyncio.run(main())


def test_a_slow_sse_client_is_cut_off_and_resumes_with_last_event_id(
        bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(queue_size=32)
    cut: list[str | None] = []
    bridge.hub.on_slow(lambda sub: cut.append(sub.reason))

    async def main() -> None:
        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=30) as http, \
                http.stream("GET", "/v1/runs/r/events") as slow, \
                connect(bridge.ws_url("r"), proxy=None) as fast:
            wait_for(lambda: bridge.hub.subscribers("r") == 2, 5, "two subscribers")
            published = 0
            async with asyncio.timeout(60):
                while not cut:  # the SSE response is never read meanwhile
                    await asyncio.gather(*(bridge.emit("r", i, summary_bytes=8000)
                                           for i in range(published + 1, published + 17)))
                    published += 16
                    await receive_until(fast, published)  # the fast client keeps up
            events = [e async for e in sse_events(slow)]
        ids = [int(e["id"]) for e in events if "id" in e]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) < published
        assert events[-1] == {"comment": "too slow: resume with ?after=<last seq>"}

        async with httpx.AsyncClient(
                base_url=bridge.http, headers=bridge.auth, timeout=10) as http, \
                http.stream("GET", "/v1/runs/r/events",
                            headers={"Last-Event-ID": str(ids[-1])}) as again:
            rest = [int(e["id"]) for e in await read_sse_until(again, published)]
        assert ids + rest == list(range(1, published + 1))

    asyncio.run(main())
