"""RunControl.news: the read of the run's state a step waits for before it starts, shared
with the read begun when the step before it returned (``settled``)."""

from __future__ import annotations

import asyncio
import time
import uuid

from planrun.flows import control
from planrun.flows.control import RunControl


class Recorder:
    """A scheduler that records what the control told it."""

    def __init__(self) -> None:
        self.pause_reason: str | None = None
        self.gate = None
        self.paused: list[str] = []

    def pause(self, reason: str) -> None:
        self.paused.append(reason)
        self.pause_reason = reason


class Server:
    """The flow run's state as the Prefect server has it; each read takes ``delay_s`` and
    answers with the state as it was when the read began."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.state = "RUNNING"
        self.delay_s = delay_s
        self.reads: list[float] = []

    def attach(self, ctl: RunControl) -> None:
        async def read_state() -> None:
            self.reads.append(time.monotonic())
            seen = self.state
            await asyncio.sleep(self.delay_s)
            ctl._react(State(seen))

        ctl._read_state = read_state  # type: ignore[method-assign]


class State:
    def __init__(self, kind: str) -> None:
        self.type = type("T", (), {"value": kind})()
        self.message = "paused by a person" if kind == "PAUSED" else None


def setup(delay_s: float = 0.02) -> tuple[RunControl, Server, Recorder]:
    scheduler = Recorder()
    ctl = RunControl(str(uuid.uuid4()), scheduler=scheduler)  # type: ignore[arg-type]
    server = Server(delay_s)
    server.attach(ctl)
    return ctl, server, scheduler


def test_a_step_starting_after_a_return_takes_the_read_begun_at_the_return() -> None:
    async def go() -> None:
        ctl, server, _ = setup()
        ctl.settled()  # the step before returned: its read begins now
        await asyncio.sleep(0.005)  # its task run ends, its checkpoint is written
        await ctl.news()
        assert len(server.reads) == 1

    asyncio.run(go())


def test_a_pause_accepted_before_the_return_holds_the_next_step_back() -> None:
    async def go() -> None:
        ctl, server, scheduler = setup()
        server.state = "PAUSED"  # accepted while the step ran
        ctl.settled()
        await ctl.news()
        assert scheduler.paused == ["paused by a person"]

    asyncio.run(go())


def test_a_return_during_a_read_begun_before_it_makes_news_read_again() -> None:
    async def go() -> None:
        ctl, server, scheduler = setup(delay_s=0.05)
        ctl.settled()  # one step returns: a read begins
        await asyncio.sleep(0.01)
        server.state = "PAUSED"  # accepted after that read began...
        ctl.settled()  # ...and before another step returned, while the read goes on
        await ctl.news()
        assert len(server.reads) == 2  # the first read could not have seen it
        assert scheduler.paused == ["paused by a person"]

    asyncio.run(go())


def test_news_long_after_the_last_return_reads_anew() -> None:
    async def go() -> None:
        ctl, server, scheduler = setup(delay_s=0.0)
        ctl.settled()
        await asyncio.sleep(control.OVERLAP_S + 0.05)  # the step waited (a slot, a gate)
        server.state = "PAUSED"
        await ctl.news()
        assert len(server.reads) == 2
        assert scheduler.paused == ["paused by a person"]

    asyncio.run(go())


def test_steps_asking_at_once_share_one_read() -> None:
    async def go() -> None:
        ctl, server, _ = setup()
        await asyncio.gather(*(ctl.news() for _ in range(50)))
        # The first begins a read; the 49 that asked after it began share the next one.
        assert len(server.reads) == 2

    asyncio.run(go())
