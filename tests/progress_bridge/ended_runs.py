"""A Prefect server with a long history of ended planrun runs, made cheaply: the planrun
events of one real ended run are emitted again through Prefect's event API under new run
ids, as if that many runs had run and ended (for the bridge's start-up tests and
``benchmarks/bench_bridge_start.py``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from planrun.contract.events import RUN_PREFIX

#: Events sent before waiting for the server to take them (its queue is not unbounded).
BATCH = 500


async def run_events(run_id: str) -> list[Any]:
    """Every planrun event of the run ``run_id`` in Prefect, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventOrder, EventResourceFilter

    query = EventFilter(resource=EventResourceFilter(id=[f"{RUN_PREFIX}{run_id}"]),
                        order=EventOrder.ASC)
    found: list[Any] = []
    async with get_client() as client:
        page = await client.read_events(filter=query, limit=50)
        while True:
            found += page.events
            if not page.next_page or not page.events:
                return found
            page = await client.read_events_page(str(page.next_page))


async def copy_ended_run(run_id: str, copies: int, timeout: float = 120) -> list[str]:
    """Emit the planrun events of the ended run ``run_id`` again under ``copies`` new run
    ids; return them once Prefect's API has every copy's last event."""
    from prefect.events.clients import get_events_client

    events = await run_events(run_id)
    assert events, f"no planrun events of run {run_id} in Prefect"
    new_ids = [str(uuid.uuid4()) for _ in range(copies)]
    async with get_events_client() as client:
        for count, new_id in enumerate(new_ids, 1):
            for event in events:
                await client.emit(_copy(event, run_id, new_id))
            if count * len(events) % BATCH < len(events):
                await asyncio.sleep(0)
    await _wait_stored(new_ids, events[-1].event, timeout)
    return new_ids


def _copy(event: Any, run_id: str, new_id: str) -> Any:
    from prefect.events import Resource

    labels = dict(event.resource.root)
    labels["prefect.resource.id"] = f"{RUN_PREFIX}{new_id}"
    payload = {**event.payload, "run_id": new_id} if "run_id" in event.payload else event.payload
    return event.model_copy(update={"id": uuid.uuid4(), "resource": Resource(labels),
                                    "payload": payload})


async def _wait_stored(run_ids: list[str], last_event: str, timeout: float) -> None:
    """Wait until Prefect's API has the event ``last_event`` of every run in ``run_ids``."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            stored = 0
            for first in range(0, len(run_ids), 100):
                ids = [f"{RUN_PREFIX}{r}" for r in run_ids[first:first + 100]]
                page = await client.read_events(filter=EventFilter(
                    event=EventNameFilter(name=[last_event]),
                    resource=EventResourceFilter(id=ids)), limit=1)
                stored += page.total
            if stored >= len(run_ids):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout} s Prefect has {stored} of "
                                     f"{len(run_ids)} copied runs")
            await asyncio.sleep(0.2)
