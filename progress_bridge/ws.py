"""``WS /v1/runs/{id}/ws?after=SEQ``: replay, then live messages, to one WebSocket client.

Close codes: 1008 bad token, host or origin (from ``auth.Guard``); 1013 too many
requests (``ratelimit``); 1003 a client frame that is not JSON text;
1009 a client frame over ``max_frame_bytes``; 4408 the client was too slow to keep up
(resume with ``?after=<last seq>``); 1001 the bridge is stopping; 1011 the message log
cannot be read. Client frames that
are small JSON (``{"type": "ping"}``) are read and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine, Mapping
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from planrun.contract.stream import Message
from planrun.progress_bridge.follow import follow
from planrun.progress_bridge.frames import EXTENSION, FrameWriter
from planrun.progress_bridge.hub import Disconnected, Subscription
from planrun.progress_bridge.state import BridgeState, state_of
from planrun.progress_bridge.store import StoreError

POLICY_VIOLATION = 1008
UNSUPPORTED_DATA = 1003
TOO_BIG = 1009
INTERNAL_ERROR = 1011

Close = tuple[int, str] | None  # None: the client went away, there is nothing to close

router = APIRouter()


@router.websocket("/v1/runs/{run_id}/ws")
async def run_socket(websocket: WebSocket, run_id: str, after: int = 0) -> None:
    """Every message of the run with seq > ``after``, then live ones, with heartbeats."""
    state = state_of(websocket)  # the token, Host and Origin: checked by auth.Guard
    await websocket.accept()
    await state.known(run_id)  # a run that ended before the bridge started: read it first
    sub = state.hub.subscribe(run_id)
    clients = state.metrics.clients.labels(transport="ws")
    clients.inc()
    try:
        close = await _serve(websocket, sub, state, max(after, 0))
        if close is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(*close), state.settings.close_timeout_s)
    finally:
        state.hub.unsubscribe(sub)
        sub.finished.set()
        clients.dec()


async def _serve(websocket: WebSocket, sub: Subscription, state: BridgeState,
                 after: int) -> Close:
    jobs: list[Coroutine[Any, Any, Close]] = [
        _send(websocket, sub, state, after), _receive(websocket, state), _cut_off(sub)]
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = done.pop()
    return None if first.cancelled() or first.exception() else first.result()


async def _send(websocket: WebSocket, sub: Subscription, state: BridgeState,
                after: int) -> Close:
    sent = state.metrics.sent.labels(transport="ws")
    writer: FrameWriter | None = websocket.scope.get("extensions", {}).get(EXTENSION)

    direct = None
    if writer is not None:
        def direct(batch: list[Message]) -> bool:
            written = writer.write_nowait(writer.frames(batch))
            if written:
                sent.inc(len(batch))
            return written

    stream = follow(sub, state.store, after, state.settings.heartbeat_s, direct)
    try:
        async with contextlib.aclosing(stream):
            async for batch in stream:
                if writer is None:  # a server other than BridgeServer (Starlette's TestClient)
                    for message in batch:
                        await websocket.send_text(message.wire)
                else:
                    await writer.write(writer.frames(batch))
                sent.inc(len(batch))
    except Disconnected as exc:
        return exc.code, exc.reason
    except StoreError:
        return INTERNAL_ERROR, "the message log is unavailable; try again later"
    except ClientDisconnected:
        return None
    return None


async def _cut_off(sub: Subscription) -> Close:
    # The sender may be stuck writing to a client that does not read; this does not wait
    # for it.
    await sub.closed.wait()
    return sub.code, sub.reason or "closed"


async def _receive(websocket: WebSocket, state: BridgeState) -> Close:
    limit = state.settings.max_frame_bytes
    while True:
        try:
            frame = await websocket.receive()
        except WebSocketDisconnect:
            return None
        if frame["type"] == "websocket.disconnect":
            return None
        problem = _bad_frame(frame, limit)
        if problem is not None:
            state.metrics.bad_frames.labels(why=str(problem[0])).inc()
            return problem


def _bad_frame(frame: Mapping[str, Any], limit: int) -> Close:
    text = frame.get("text")
    if text is None:
        data = frame.get("bytes") or b""
        if len(data) > limit:
            return TOO_BIG, f"frames are limited to {limit} bytes"
        return UNSUPPORTED_DATA, "frames must be JSON text"
    if len(text) > limit or len(text.encode()) > limit:
        return TOO_BIG, f"frames are limited to {limit} bytes"
    try:
        json.loads(text)
    except ValueError:
        return UNSUPPORTED_DATA, "frames must be JSON text"
    return None
