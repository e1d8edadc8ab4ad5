"""Client-side helpers: drafts for the store's and hub's unit tests, and readers for
WebSocket and SSE streams."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from planrun.contract.stream import Draft, Progress


def draft(i: int, total: int = 1000, summary_bytes: int = 0) -> Draft:
    """A ``step.completed`` draft for step ``s<i>``; ``summary_bytes`` of incompressible text."""
    summary = os.urandom(summary_bytes // 2).hex() if summary_bytes else f"step {i} done"
    return Draft(type="step.completed", step_id=f"s{i}", status="completed", attempt=1,
                 duration_s=0.01, summary=summary, progress=Progress.of(min(i, total), total))


async def receive_until(ws: ClientConnection, seq: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Messages (heartbeats left out) until the one numbered ``seq``; fails after ``timeout``."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not got or got[-1]["seq"] < seq:
            message = json.loads(await ws.recv())
            if message["type"] != "heartbeat":
                got.append(message)
    return got


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The events of an SSE response as dicts of their fields (comments under ``comment``)."""
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            event["comment"] = line[1:].strip()
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
    if event:
        yield event


async def read_sse_until(response: httpx.Response, seq: int,
                         timeout: float = 10) -> list[dict[str, str]]:
    """Events with an id (messages, not heartbeats) until the one with id ``seq``."""
    got: list[dict[str, str]] = []
    async with asyncio.timeout(timeout):
        async for event in sse_events(response):
            if "id" in event:
                got.append(event)
                if int(event["id"]) >= seq:
                    break
    return got
