"""``FlowRunStates`` (flows/control.py) against the test session's Prefect server: the
states of many runs in one read, a run that was asked something read in full."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Cancelling, Paused, Running, State

from planrun.flows.control import FlowRunStates, Seen


@flow(name="planrun-states-stand-in")
def stand_in() -> None:  # never runs: its flow runs are only created
    return None


class Counted(FlowRunStates):
    """Counts its reads: how many runs each one covered."""

    def __init__(self) -> None:
        super().__init__(poll_s=0.05)
        self.reads: list[int] = []

    async def _read(self, client: Any, run_ids: list[UUID], full: bool = False
                    ) -> dict[UUID, Seen]:
        self.reads.append(len(run_ids))
        return await super()._read(client, run_ids, full)


async def runs_in(states: list[State[Any]]) -> list[UUID]:
    ids = []
    async with get_client() as client:
        for state in states:
            flow_run = await client.create_flow_run(stand_in)
            await client.set_flow_run_state(flow_run.id, state, force=True)
            ids.append(flow_run.id)
    return ids


def test_many_runs_states_are_read_in_one_request_and_a_pause_in_full() -> None:
    async def go() -> tuple[list[Any], list[int]]:
        running, paused, cancelling, *more = await runs_in(
            [Running(), Paused(reschedule=True, pause_key="approval-a-01", message="held"),
             Cancelling(), *(Running() for _ in range(5))])
        states = Counted()
        got = await asyncio.gather(*(states.next(run_id) for run_id in
                                     [running, paused, cancelling, *more]))
        return got, states.reads

    got, reads = asyncio.run(go())
    assert reads == [8]  # one read for all eight runs
    assert [seen.state.type.value for seen in got] == \
        ["RUNNING", "PAUSED", "CANCELLING", *["RUNNING"] * 5]
    paused = got[1].state
    assert paused.message == "held" and paused.state_details.pause_key == "approval-a-01"


def test_each_next_is_a_read_of_its_own_and_a_run_the_server_does_not_know_gets_none() -> None:
    async def go() -> tuple[Any, list[Any], list[int]]:
        (running,) = await runs_in([Running()])
        states = Counted()
        unknown = await states.next(UUID(int=7))
        first = await states.next(running)
        second = await states.next(running)
        return unknown, [first, second], states.reads

    unknown, seen, reads = asyncio.run(go())
    assert unknown is None
    assert [got.state.type.value for got in seen] == ["RUNNING", "RUNNING"]
    assert reads == [1, 1, 1]  # a next() after a read is answered by the read after it


def test_a_read_every_full_read_s_has_the_runs_labels() -> None:
    async def go() -> list[Seen | None]:
        (running,) = await runs_in([Running()])
        async with get_client() as client:
            await client.update_flow_run_labels(running, {"planrun.process": "named"})
        states = FlowRunStates(poll_s=0.05, full_read_s=3600)
        first = await states.next(running)  # a state type only
        states.full_read_s = 0
        second = await states.next(running)  # in full: labels and all
        return [first, second]

    first, second = asyncio.run(go())
    assert first is not None and first.labels is None
    assert second is not None and second.labels is not None
    assert second.labels["planrun.process"] == "named"
    assert second.state.type.value == "RUNNING"
