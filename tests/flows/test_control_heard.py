"""RunControl takes a person's pause in from the flow run's state and says so on the flow
run (``planrun.pause-heard``), after its scheduler has stopped starting steps: the bridge
answers the pause only then (docs/http-api.md)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from prefect.states import Paused, Running

from planrun.contract.control import PAUSE_HEARD_LABEL
from planrun.flows.control import RunControl


class Recorder:
    """A scheduler that records what the control told it, and when labels were written."""

    def __init__(self) -> None:
        self.pause_reason: str | None = None
        self.gate = None
        self.log: list[str] = []

    def pause(self, reason: str, gate: str | None = None) -> None:
        self.log.append(f"pause: {reason}")
        self.pause_reason = reason

    def unpause(self) -> None:
        self.log.append("unpause")
        self.pause_reason = None


def control() -> tuple[RunControl, Recorder]:
    scheduler = Recorder()
    ctl = RunControl(str(uuid.uuid4()), scheduler=scheduler)  # type: ignore[arg-type]

    async def label_as(labels: dict[str, str]) -> None:
        scheduler.log.append(f"label: {labels}")

    ctl._label_as = label_as  # type: ignore[method-assign]
    return ctl, scheduler


def test_a_pause_is_taken_in_then_said_heard_once() -> None:
    async def go() -> list[str]:
        ctl, scheduler = control()
        paused: Any = Paused(message="paused by a person")
        ctl._react(paused)
        ctl._react(paused)  # the next poll reads the same state: said once
        await asyncio.sleep(0)
        return scheduler.log

    log = asyncio.run(go())
    assert log[0] == "pause: paused by a person"  # the scheduler first...
    assert log[2].startswith(f"label: {{'{PAUSE_HEARD_LABEL}': ")  # ...then the label
    assert log[1] == "pause: paused by a person"
    assert len([line for line in log if line.startswith("label")]) == 1


def test_the_label_names_the_paused_state_it_heard() -> None:
    async def go() -> tuple[list[str], str, str]:
        ctl, scheduler = control()
        first: Any = Paused(message="paused by a person")
        ctl._react(first)
        await asyncio.sleep(0)
        ctl._react(Running())  # resumed before the pause took effect
        second: Any = Paused(message="paused by a person")
        ctl._react(second)  # paused again: a new state, heard again
        await asyncio.sleep(0)
        return scheduler.log, str(first.id), str(second.id)

    log, first, second = asyncio.run(go())
    labels = [line for line in log if line.startswith("label")]
    assert labels == [f"label: {{'{PAUSE_HEARD_LABEL}': '{first}'}}",
                      f"label: {{'{PAUSE_HEARD_LABEL}': '{second}'}}"]
    assert "unpause" in log


def test_a_gates_own_pause_is_not_said_heard() -> None:
    async def go() -> list[str]:
        ctl, scheduler = control()
        ctl._react(Paused(pause_key="approval-a-0123", message="waiting for approval"))
        await asyncio.sleep(0)
        return scheduler.log

    assert asyncio.run(go()) == ["pause: waiting for approval"]


def test_news_reads_nothing_before_a_step() -> None:
    async def go() -> None:
        ctl, scheduler = control()

        async def no_reads(client: Any) -> Any:
            raise AssertionError("news read the flow run")

        ctl._seen = no_reads  # type: ignore[method-assign]
        await ctl.news()

    asyncio.run(go())
