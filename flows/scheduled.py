"""The server's word that a run of a deployment was scheduled: what wakes a runner at once
instead of at its next poll (``flows.loop_runner`` and the process-per-run runner of
``flows.serve``; docs/production.md, "Taking runs")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID

log = logging.getLogger("planrun.runner")

#: The server's events of a flow run's state, and the label of a Scheduled state (whatever
#: its name): such an event of the deployment's run wakes the runner.
FLOW_RUN_EVENT = "prefect.flow-run."
SCHEDULED_STATE: dict[str, str | list[str]] = {"prefect.state-type": "SCHEDULED"}
#: How long to wait before subscribing again after the event stream failed (the runner's
#: poll takes the runs meanwhile).
RESUBSCRIBE_S = 5.0


async def follow_scheduled(deployment_id: UUID, announce: Callable[[str], None],
                           subscribed: Callable[[], None]) -> None:
    """Call ``announce`` with the resource id (``prefect.flow-run.<id>``) of each run of
    the deployment the server gives a Scheduled state: a submit (``Scheduled``), a resume
    (``Resuming``), a retry (``AwaitingRetry``), a run scheduled again after a crash; and
    ``subscribed`` each time the subscription starts (what was scheduled before it is
    to be read then). Until cancelled."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import (
        EventAnyResourceFilter,
        EventFilter,
        EventNameFilter,
        EventResourceFilter,
    )
    from prefect.events.schemas.events import ResourceSpecification

    # The server applies all three to its live stream (docs/prefect-notes.md, "Events").
    scheduled = EventFilter(
        event=EventNameFilter(prefix=[FLOW_RUN_EVENT]),
        resource=EventResourceFilter(labels=ResourceSpecification(SCHEDULED_STATE)),
        any_resource=EventAnyResourceFilter(id=[f"prefect.deployment.{deployment_id}"]))
    while True:
        try:
            async with get_events_subscriber(filter=scheduled) as events:
                subscribed()
                async for event in events:
                    announce(event.resource.id)
        except Exception as exc:  # noqa: BLE001 - the poll takes the runs meanwhile
            log.warning("cannot follow the server's events (%s); the runner's poll takes "
                        "the runs meanwhile", exc)
        await asyncio.sleep(RESUBSCRIBE_S)
