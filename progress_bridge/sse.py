"""``GET /v1/runs/{id}/events``: the WebSocket stream as Server-Sent Events.

Each message is an event with ``id:`` its seq and ``event:`` its type, so a browser's
EventSource resumes by itself with ``Last-Event-ID``; ``?after=`` does the same by hand.
Heartbeats are ``event: heartbeat`` without an id. A client too slow to keep up gets a
comment saying so and the stream ends; reconnecting resumes where it stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from planrun.contract.stream import MessageType
from planrun.progress_bridge.follow import follow
from planrun.progress_bridge.hub import Disconnected
from planrun.progress_bridge.state import BridgeState, state_of

router = APIRouter()


@router.get("/v1/runs/{run_id}/events", response_class=EventSourceResponse)
async def run_events(request: Request, run_id: str, after: int | None = None,
                     last_event_id: str | None = Header(default=None)) -> EventSourceResponse:
    """Every message of the run with seq > ``after`` (or ``Last-Event-ID``), then live ones."""
    state = state_of(request)
    start = after if after is not None else _seq(last_event_id)
    return EventSourceResponse(_events(state, run_id, max(start, 0)),
                               send_timeout=state.settings.close_timeout_s)


def _seq(last_event_id: str | None) -> int:
    try:
        return int(last_event_id or 0)
    except ValueError:
        return 0


async def _events(state: BridgeState, run_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    await state.known(run_id)  # a run that ended before the bridge started: read it first
    sub = state.hub.subscribe(run_id)
    clients = state.metrics.clients.labels(transport="sse")
    sent = state.metrics.sent.labels(transport="sse")
    clients.inc()
    stream = follow(sub, state.store, after, state.settings.heartbeat_s)
    try:
        async with contextlib.aclosing(stream):
            async for batch in stream:
                for message in batch:
                    if message.type == MessageType.HEARTBEAT:
                        yield ServerSentEvent(data=message.wire, event=message.type)
                    else:
                        yield ServerSentEvent(data=message.wire, event=message.type,
                                              id=str(message.seq))
                    sent.inc()
    except Disconnected as exc:
        yield ServerSentEvent(comment=exc.reason)
    finally:
        state.hub.unsubscribe(sub)
        sub.finished.set()
        clients.dec()
