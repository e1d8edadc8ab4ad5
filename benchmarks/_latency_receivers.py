"""The receivers of bench_latency.py, in its own process: raw Prefect subscribers to the
task-run events and to planrun's events (:class:`Receivers`) and one WebSocket client of
the bridge per run (:class:`WsClient`), each stamping the wall-clock time it gets a message.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from _bridge import Bridge
from _common import RUN_END_TYPES


def flow_run_of(event: Any) -> str | None:
    for related in event.related:
        if related.role == "flow-run" and related.id.startswith("prefect.flow-run."):
            return str(related.id.removeprefix("prefect.flow-run."))
    return None


class Receivers:
    """Prefect subscribers (task-run events; planrun's events) in this process, keeping
    the first receipt of each (run, step, state)."""

    def __init__(self) -> None:
        # (run_id, step_id, "Running"|"Completed") -> (occurred, received)
        self.task_runs: dict[tuple[str, str, str], tuple[float, float]] = {}
        # (run_id, step_id, "running"|"completed") -> (occurred, received)
        self.planrun: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.duplicates = 0
        self.ready = {"task-runs": asyncio.Event(), "planrun": asyncio.Event()}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._follow(["prefect.task-run."], "task-runs")),
                      asyncio.ensure_future(self._follow(["planrun."], "planrun"))]

    async def wait_ready(self) -> None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.ready.values())), 60)

    async def _follow(self, prefixes: list[str], which: str) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        event_filter = EventFilter(event=EventNameFilter(prefix=prefixes))
        async with get_events_subscriber(filter=event_filter,
                                         reconnection_attempts=0) as events:
            self.ready[which].set()
            async for event in events:
                received = time.time()
                if which == "task-runs":
                    self._task_run(event, received)
                else:
                    self._planrun(event, received)
        raise RuntimeError(f"Prefect closed the {which} event stream")

    def _task_run(self, event: Any, received: float) -> None:
        state = event.event.removeprefix("prefect.task-run.")
        if state not in ("Running", "Completed"):
            return
        run_id = flow_run_of(event)
        name = event.resource.get("prefect.resource.name")
        if run_id is None or name is None:
            return
        key = (run_id, str(name), state)
        if key in self.task_runs:
            self.duplicates += 1
            return
        self.task_runs[key] = (event.occurred.timestamp(), received)

    def _planrun(self, event: Any, received: float) -> None:
        if not event.event.startswith("planrun.step."):
            return
        payload = event.payload
        key = (str(payload.get("run_id")), str(payload.get("step_id")),
               str(payload.get("status")))
        self.planrun.setdefault(key, (event.occurred.timestamp(), received))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("a subscriber failed") from task.exception()


class WsClient:
    """One WebSocket client of the bridge for one run: receipt time of every message."""

    def __init__(self, bridge: Bridge, run_id: str) -> None:
        self.url = bridge.ws_url(run_id, after=0)
        self.first: dict[tuple[str, str], float] = {}  # (step_id, type) -> received
        self.seqs: list[int] = []
        self.ended = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.connected_at = 0.0

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        ws = await connect(self.url, proxy=None, open_timeout=30, max_size=None)
        self.connected_at = time.time()
        self.task = asyncio.ensure_future(self._read(ws))

    async def _read(self, ws: Any) -> None:
        try:
            async for text in ws:
                received = time.time()
                message = json.loads(text)
                kind = message["type"]
                if kind == "heartbeat":
                    continue
                self.seqs.append(message["seq"])
                if message.get("step_id") is not None:
                    self.first.setdefault((message["step_id"], kind), received)
                if kind in RUN_END_TYPES:
                    self.ended.set()
                    break
        finally:
            await ws.close()

    def check(self) -> dict[str, int]:
        """Sequence check: seq 1..N, no gap, no duplicate."""
        last = max(self.seqs, default=0)
        return {"messages": len(self.seqs), "last_seq": last,
                "duplicates": len(self.seqs) - len(set(self.seqs)),
                "missing": len(set(range(1, last + 1)) - set(self.seqs))}
