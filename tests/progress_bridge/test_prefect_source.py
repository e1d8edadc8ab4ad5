"""The bridge's reader of Prefect events: which events it follows, what it does with a
malformed one, and how it notices events Prefect dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from prefect.events import Event, RelatedResource, Resource

from planrun.contract.events import StepChanged, step_event
from planrun.contract.status import StepStatus
from planrun.progress_bridge.apply import FlowRunEnded, RunEvent
from planrun.progress_bridge.prefect_source import (
    GAP_READS,
    WAIT_FOR_AT_MOST,
    PrefectEventSource,
    incoming,
)
from planrun.progress_bridge.timers import Later
from planrun.progress_bridge.upstream_settings import UpstreamSettings


def _event(name: str, resource: str, payload: dict[str, Any]) -> Event:
    return Event(event=name, resource=Resource({"prefect.resource.id": resource}), payload=payload)


def _step(run_id: str, n: int) -> Event:
    payload = StepChanged(run_id=run_id, n=n, step_id="a", status=StepStatus.COMPLETED,
                          attempt=1)
    return _event(step_event(StepStatus.COMPLETED), f"planrun.run.{run_id}",
                  payload.model_dump(mode="json"))


def test_a_planrun_step_event_is_read_with_its_run_and_payload() -> None:
    found = incoming(_step("r1", 4))
    assert found is not None and getattr(found, "run_id", None) == "r1"
    assert found.payload.n == 4  # type: ignore[union-attr]


def test_events_about_other_resources_or_of_unknown_kinds_are_not_followed() -> None:
    assert incoming(_event("prefect.task-run.Completed", "prefect.task-run.x", {})) is None
    assert incoming(_event("planrun.run.renamed", "planrun.run.r1", {})) is None


def test_a_malformed_planrun_event_is_left_out_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[Any] = []

    async def take() -> bool:
        source = PrefectEventSource(UpstreamSettings(), Later())

        def deliver(event: Any) -> bool:
            delivered.append(event)
            return True

        source._deliver = deliver
        bad = _event(step_event(StepStatus.COMPLETED), "planrun.run.r1", {"n": "many"})
        with caplog.at_level(logging.WARNING, logger="planrun.bridge"):
            taken = source._take(bad)
        return taken or source._take(_step("r1", 1))

    assert asyncio.run(take())
    assert len(delivered) == 1
    assert "is left out" in caplog.text and "planrun.step.completed" in caplog.text


def test_a_jump_in_a_runs_event_numbers_reads_the_missing_ones_back(
        caplog: pytest.LogCaptureFixture) -> None:
    async def jump() -> bool:
        later = Later()
        source = PrefectEventSource(UpstreamSettings(settle_s=0.0, lookback_s=1.0), later)
        source._deliver = lambda event: True
        reads = 0
        with caplog.at_level(logging.WARNING, logger="planrun.bridge"):
            source._take(_step("r1", 1))
            source._take(_step("r1", 2))
            source._take(_step("r1", 5))
            while (recheck := source._recheck) is not None:
                await recheck  # reconciles against the test session's Prefect server
                reads += 1
        await later.close()
        return reads

    # 3 and 4 were never sent: read again while Prefect may not have stored them yet
    assert asyncio.run(jump()) == 1 + GAP_READS
    assert "events 3..4 of run r1 are missing; reconciling" in caplog.text
    assert "events 3..4 of run r1 never came back from Prefect" in caplog.text



def test_a_gap_found_while_gaps_are_being_read_gets_a_read_of_its_own(
        caplog: pytest.LogCaptureFixture) -> None:
    """The read of one gap took seconds on a loaded server; a gap of another run found
    meanwhile was left for a later gap that might never come (a run whose last events
    were the missing ones)."""
    recalled: list[str] = []

    async def gaps() -> list[str]:
        later = Later()
        source = PrefectEventSource(UpstreamSettings(settle_s=0.0, lookback_s=1.0), later)
        source._deliver = lambda event: True

        async def reconcile() -> int:
            if not recalled:  # during the first read: r2 jumps from 1 to 4
                source._take(_step("r2", 1))
                source._take(_step("r2", 4))
            return 0

        async def recall(run_id: str) -> int:
            recalled.append(run_id)
            for n in {"r1": [2], "r2": [2, 3]}[run_id]:  # what Prefect kept
                source._take(_step(run_id, n))
            return 0

        source.reconcile = reconcile  # type: ignore[method-assign]
        source.recall = recall  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="planrun.bridge"):
            source._take(_step("r1", 1))
            source._take(_step("r1", 3))
            first = source._recheck
            assert first is not None
            await first
            second = source._recheck
            assert second is not None and second is not first
            await second
        await later.close()
        return recalled

    assert asyncio.run(gaps()) == ["r1", "r2"]
    assert "events 2..3 of run r2 are missing" in caplog.text


def stubbed(deliver: Callable[[Any], bool],
            reads: Callable[[PrefectEventSource], int]) -> tuple[PrefectEventSource, Later]:
    """A source (made in a running loop) whose reads of Prefect's API after a jump are
    ``reads`` (given the source, to take what the API gives back), read again at once."""
    later = Later()
    source = PrefectEventSource(UpstreamSettings(settle_s=0.0, lookback_s=1.0), later)
    source._deliver = deliver

    async def reconcile() -> int:
        return reads(source)

    async def recall(run_id: str) -> int:
        return 0

    source.reconcile = reconcile  # type: ignore[method-assign]
    source.recall = recall  # type: ignore[method-assign]
    return source, later


async def settled(source: PrefectEventSource, later: Later) -> None:
    """Every read after a jump done, the source's timers closed."""
    while (recheck := source._recheck) is not None:
        await recheck
    await later.close()


def test_a_runs_live_events_after_a_jump_wait_until_the_missing_ones_are_read_back() -> None:
    """Prefect's stream dropped events 3 and 4 of r1 (a full subscriber queue: 1,000-step
    runs under load) and went on with 5 and with Prefect's end of the flow run. Applied as
    they came, the run ended before some of its steps did, and a watcher's stream, which
    ends at the run's end, never showed them. They now wait for the read of 3 and 4, then
    go on in the run's order; another run's events are not held up."""
    order: list[tuple[str, int | str]] = []
    five = _step("r1", 5)  # sent live late, and also read back from the API
    seen: set[str] = set()

    def deliver(event: Any) -> bool:  # as the upstream's store: each event once
        if event.id in seen:
            return False
        seen.add(event.id)
        order.append((event.run_id, event.payload.n if isinstance(event, RunEvent)
                      else event.state))
        return True

    def missing_ones(source: PrefectEventSource) -> int:  # what Prefect's API gives back
        assert order == [("r1", 1), ("r1", 2), ("r2", 1)]  # nothing of r1 after the jump
        for event in (_step("r1", 3), _step("r1", 4), five):
            source._take(event)
        return 3

    ended = Event(event="prefect.flow-run.Completed",
                  resource=Resource({"prefect.resource.id": "prefect.flow-run.r1"}),
                  related=[RelatedResource({"prefect.resource.id": "prefect.tag.planrun",
                                            "prefect.resource.role": "tag"})],
                  payload={"validated_state": {"type": "COMPLETED"}})
    assert isinstance(incoming(ended), FlowRunEnded)

    async def jump() -> None:
        source, later = stubbed(deliver, missing_ones)
        for event in (_step("r1", 1), _step("r1", 2), _step("r1", 6), ended, _step("r2", 1),
                      five):
            source._take(event, live=True)
        await settled(source, later)

    asyncio.run(jump())
    assert order == [("r1", 1), ("r1", 2), ("r2", 1), ("r1", 3), ("r1", 4), ("r1", 5),
                     ("r1", 6), ("r1", "COMPLETED")]


def test_a_jump_is_read_again_until_prefect_has_stored_the_missing_events() -> None:
    """A busy server's persister had not stored the missing events when they were first
    read: the run's live events wait for a later read that finds them."""
    order: list[int] = []
    reads: list[int] = []

    def stored_by_the_third_read(source: PrefectEventSource) -> int:
        reads.append(len(order))
        if len(reads) == 3:
            source._take(_step("r1", 2))
        return 0

    async def jump() -> None:
        source, later = stubbed(lambda event: order.append(event.payload.n) or True,
                                stored_by_the_third_read)
        for n in (1, 3, 4):
            source._take(_step("r1", n), live=True)
        await settled(source, later)

    asyncio.run(jump())
    assert reads == [1, 1, 1]  # nothing after the jump went on before 2 came
    assert order == [1, 2, 3, 4]


def test_a_jump_too_wide_to_wait_for_is_read_back_once_and_holds_nothing_in_memory() -> None:
    """Anything that reaches Prefect's server can write to its event stream: an event of
    a run numbered 999,999 after its 1st is not a million numbers to wait for."""
    order: list[int] = []
    reads: list[int] = []

    def never_found(source: PrefectEventSource) -> int:
        reads.append(len(order))
        return 0

    async def jump() -> int:
        source, later = stubbed(lambda event: order.append(event.payload.n) or True,
                                never_found)
        source._take(_step("r1", 1), live=True)
        source._take(_step("r1", WAIT_FOR_AT_MOST + 3), live=True)
        tracked = sum(len(found) for found in source._missing.values())
        await settled(source, later)
        return tracked

    assert asyncio.run(jump()) == 0
    assert reads == [1]  # one read, then the held event goes on
    assert order == [1, WAIT_FOR_AT_MOST + 3]
