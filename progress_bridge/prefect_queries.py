"""What the bridge asks Prefect for (``progress_bridge/prefect_source.py`` asks it): the
event filters of its subscription and of its reads from ``POST /events/filter`` (planrun's
events and Prefect's flow-run events, without heartbeats: all of them, those since a time,
or those of given runs), and the planrun flow runs not ended or ended since a time, read
from ``POST /flow_runs/filter`` page by page.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from planrun.contract.control import RUN_TAG
from planrun.contract.events import RUN_PREFIX

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.objects import FlowRun
    from prefect.events.filters import EventFilter

FLOW_RUN_PREFIX = "prefect.flow-run."
FLOW_RUNS_PAGE = 200  # POST /flow_runs/filter answers at most 200 a page
#: The flow-run state types of a run still going (or yet to start).
NOT_ENDED = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


async def flow_runs(client: PrefectClient, query: FlowRunFilter) -> list[FlowRun]:
    """Every flow run ``query`` finds, page by page."""
    found: list[FlowRun] = []
    while True:
        page = await client.read_flow_runs(flow_run_filter=query, limit=FLOW_RUNS_PAGE,
                                           offset=len(found))
        found += page
        if len(page) < FLOW_RUNS_PAGE:
            return found


def not_ended() -> FlowRunFilter:
    """The planrun flow runs still going or yet to start (``NOT_ENDED``)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    return FlowRunFilter(tags=FlowRunFilterTags(all_=[RUN_TAG]), state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType(kind) for kind in NOT_ENDED])))


def ended_since(since: float, *, crashed_only: bool = False) -> FlowRunFilter:
    """The planrun flow runs that ended (crashed, with ``crashed_only``) after ``since``."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])) \
        if crashed_only else None
    return FlowRunFilter(
        tags=FlowRunFilterTags(all_=[RUN_TAG]), state=state,
        end_time=FlowRunFilterEndTime.model_validate(
            {"after_": datetime.fromtimestamp(since, UTC).isoformat()}))


def _names() -> Any:
    from prefect.events.filters import EventNameFilter

    return EventNameFilter(prefix=["planrun.", FLOW_RUN_PREFIX],
                           exclude_name=["prefect.flow-run.heartbeat"])


def live_filter() -> EventFilter:
    """The events the bridge subscribes to."""
    from prefect.events.filters import EventFilter

    return EventFilter(event=_names())


def query_filter(since: float) -> EventFilter:
    """The events the bridge follows since ``since`` (epoch s), oldest first."""
    from prefect.events.filters import EventFilter, EventOrder

    return EventFilter(event=_names(), order=EventOrder.ASC, occurred=_window(since))


def runs_filter(run_ids: list[str], since: float) -> EventFilter:
    """The planrun events and flow-run events of ``run_ids`` since ``since``."""
    from prefect.events.filters import EventFilter, EventOrder, EventResourceFilter

    resources = [f"{prefix}{run_id}" for run_id in run_ids
                 for prefix in (RUN_PREFIX, FLOW_RUN_PREFIX)]
    return EventFilter(event=_names(), order=EventOrder.ASC, occurred=_window(since),
                       resource=EventResourceFilter(id=resources))


def _window(since: float) -> Any:
    from prefect.events.filters import EventOccurredFilter

    return EventOccurredFilter.model_validate({
        "since": datetime.fromtimestamp(since, UTC).isoformat(),
        "until": (datetime.now(UTC) + timedelta(days=1)).isoformat()})
