"""The bridge's crash rule through its one path (a fake event source, fake flow runs, the
real upstream with its timer): a run whose process ran here and has exited is marked
crashed within a second or two, not after ``dead_after_s``; then a run of a deployment is
scheduled again, and a run of ``planrun run`` (no runner can start it again) ends failed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from planrun.contract.events import RunProcess, RunStarted
from planrun.contract.status import RunStatus
from planrun.processes import this_place
from planrun.progress_bridge.apply import FlowRunEnded, RunEvent
from planrun.progress_bridge.flow_runs import FakeFlowRuns, FlowRun
from planrun.progress_bridge.source import FakeEventSource
from planrun.progress_bridge.upstream import Upstream
from planrun.progress_bridge.upstream_settings import UpstreamSettings

from .conftest import fed_upstream
from .events import ended, exited_process, started, this_process

#: The timer on, the silence rule out of reach: only the process rule can act here.
SETTINGS = UpstreamSettings(history=False, ticks=True, dead_after_s=3600, settle_s=0.5,
                            grace_s=0.2)


def started_in(run_id: str, process: RunProcess) -> RunEvent:
    event = started(run_id, steps=2)
    assert isinstance(event.payload, RunStarted)
    return RunEvent(event.id, event.name, run_id, time.time(),
                    event.payload.model_copy(update={"process": process}))


async def until(condition: Callable[[], object], what: str) -> None:
    try:
        async with asyncio.timeout(20):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no {what} within 20 s") from None


def test_a_run_whose_process_has_exited_is_crashed_at_once_then_recovered_if_it_can_be(
        tmp_path: Path) -> None:
    flow_runs = FakeFlowRuns({
        "deployed": FlowRun("deployed", "RUNNING", state_id="s1"),
        "local": FlowRun("local", "RUNNING", state_id="s1", deployed=False)})

    def states(run_id: str) -> list[str]:
        return [call[2] for call in flow_runs.calls if call[:2] == ("set_state", run_id)]

    async def main() -> None:
        async with fed_upstream(tmp_path, flow_runs=flow_runs, settings=SETTINGS) as (
                state, source):
            for run_id in ("deployed", "local"):
                assert await source.push(started_in(run_id, exited_process("s1")))
                await until(lambda r=run_id: states(r) == ["CRASHED"], f"crash of {run_id}")
                # What Prefect then says: the flow run ended crashed.
                assert await source.push(FlowRunEnded(f"{run_id}-crash", run_id, time.time(),
                                                      "CRASHED", "its process has exited"))
            await until(lambda: states("deployed") == ["CRASHED", "SCHEDULED"],
                        "the deployed run scheduled again")
            await until(lambda: state.views["local"].record.status == RunStatus.FAILED,
                        "the local run to end")
            assert states("local") == ["CRASHED"]  # no runner could start it again
            assert state.views["deployed"].record.status == RunStatus.RUNNING

    asyncio.run(main())
    message = [call[3] for call in flow_runs.calls if call[1] == "deployed"][0]
    assert message.startswith("its process ") and message.endswith(" has exited")


def test_a_run_ended_by_prefect_alone_is_forgotten_by_the_deadlines(tmp_path: Path) -> None:
    """Its planrun end event lost, a run is ended by Prefect's word alone: its signs of life
    and process are dropped as for any ended run, so nothing is left to grow run by run."""
    upstream = Upstream(FakeEventSource(), SETTINGS)

    async def main() -> None:
        async with fed_upstream(tmp_path, settings=SETTINGS, upstream=upstream) as (
                state, source):
            assert await source.push(started_in("r", this_process(state_id="s1")))
            await until(lambda: "r" in upstream.deadlines.processes, "the run's process")
            assert await source.push(FlowRunEnded("r-end", "r", time.time(), "FAILED",
                                                  "the engine raised"))
            await until(lambda: state.views["r"].ended, "the run to end")
            assert "r" not in upstream.deadlines.alive
            assert "r" not in upstream.deadlines.processes

    asyncio.run(main())


def test_a_run_whose_end_the_stream_dropped_is_ended_by_it_read_with_the_runs_own_events(
        tmp_path: Path) -> None:
    """Its flow run ended, its own end event not delivered (dropped for a lagging bridge):
    the bridge reads that run's events again and ends it as its engine said, without
    reading the whole stream since its cursor (at 50 runs at once, those reads, one per
    run ending so, were a fifth of the Prefect server's CPU)."""
    upstream = Upstream(FakeEventSource(), SETTINGS)

    async def main() -> None:
        async with fed_upstream(tmp_path, settings=SETTINGS, upstream=upstream) as (
                state, source):
            assert await source.push(started_in("r", this_process(state_id="s1")))
            source.store(ended("r", 2, RunStatus.COMPLETED_WITH_ERRORS))
            before = source.reconciled
            assert await source.push(FlowRunEnded("r-end", "r", time.time(), "COMPLETED",
                                                  "All states completed."))
            await until(lambda: state.views["r"].ended, "the run to end")
            assert state.views["r"].record.status == RunStatus.COMPLETED_WITH_ERRORS
            assert source.recalled == ["r"] and source.reconciled == before

    asyncio.run(main())


class CountingReads(FakeFlowRuns):
    reads = 0

    async def read(self, run_id: str) -> FlowRun:
        self.reads += 1
        return await super().read(run_id)


def test_two_reports_of_one_crash_schedule_the_run_again_once(tmp_path: Path) -> None:
    """The runner and the bridge may both mark a run Crashed (its process died under
    both): the second report finds the run scheduled again already and is left alone, so
    the run is never scheduled twice (a second process beside the first)."""
    flow_runs = CountingReads({"r": FlowRun("r", "CRASHED", state_id="s1")})

    async def main() -> None:
        async with fed_upstream(tmp_path, flow_runs=flow_runs, settings=SETTINGS) as (
                state, source):
            assert await source.push(started_in("r", this_process(state_id="s1")))
            for n in (1, 2):
                assert await source.push(FlowRunEnded(f"crash-{n}", "r", time.time(),
                                                      "CRASHED", "the process died"))
                # Each report reads the flow run once, and is then done with it.
                await until(lambda n=n: flow_runs.reads == n, f"report {n} to be handled")
            assert state.views["r"].record.status == RunStatus.RUNNING

    asyncio.run(main())
    assert [call[2] for call in flow_runs.calls] == ["SCHEDULED"]


def test_a_restarted_bridge_crashes_at_once_a_run_whose_process_exited_while_it_was_down(
        tmp_path: Path) -> None:
    """The process a run named is kept in its saved view: a bridge that starts again
    looks at it on its first tick, without waiting for a word from the run."""
    flow_runs = FakeFlowRuns({"run": FlowRun("run", "RUNNING", state_id="s1")})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        process = RunProcess(place=this_place(), pid=sleeper.pid,
                             started=psutil.Process(sleeper.pid).create_time(), state_id="s1")

        async def before() -> None:
            async with fed_upstream(tmp_path, flow_runs=flow_runs, settings=SETTINGS) as (
                    state, source):
                assert await source.push(started_in("run", process))
                await until(lambda: "run" in state.views, "the run's view")
        asyncio.run(before())
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert flow_runs.calls == []  # it was alive: left alone

    async def after() -> None:
        async with fed_upstream(tmp_path, flow_runs=flow_runs, settings=SETTINGS):
            await until(lambda: [c[2] for c in flow_runs.calls if c[0] == "set_state"]
                        == ["CRASHED"], "the run marked crashed")

    asyncio.run(after())
    assert [call[3] for call in flow_runs.calls][0] == f"its process {sleeper.pid} has exited"


def test_a_run_whose_flow_run_completed_before_its_own_end_came_waits_for_it(
        tmp_path: Path) -> None:
    """A loaded server takes a run's events in late: its flow run's Completed state can
    come well before the run's own ``run.completed``. The run is not ended failed by
    Prefect's word meanwhile; its own end, once it comes, ends it completed."""
    async def main() -> RunStatus:
        async with fed_upstream(tmp_path, settings=SETTINGS) as (state, source):
            assert await source.push(started_in("r", this_process(state_id="s1")))
            assert await source.push(FlowRunEnded("r-end", "r", time.time(), "COMPLETED",
                                                  "completed"))
            # Past the grace and settle times (0.2 s, 0.5 s): still not ended by Prefect.
            await asyncio.sleep(2.0)
            assert not state.views["r"].ended
            assert await source.push(ended("r", 2))
            await until(lambda: state.views["r"].ended, "the run to end")
            return state.views["r"].record.status

    assert asyncio.run(main()) == RunStatus.COMPLETED


def test_a_run_whose_last_events_the_stream_lost_is_ended_by_them_read_back_once_quiet(
        tmp_path: Path) -> None:
    """Its end occurred just before a bridge took over (or the stream dropped it): no later
    event shows a gap, its process runs on this machine or has not been seen to exit.
    Quiet for ``quiet_s``, the run's events are read once, and its end with them."""
    settings = replace(SETTINGS, quiet_s=0.5)
    upstream = Upstream(FakeEventSource(), settings)

    async def main() -> None:
        async with fed_upstream(tmp_path, settings=settings, upstream=upstream) as (
                state, source):
            assert await source.push(started_in("r", this_process(state_id="s1")))
            source.store(ended("r", 2))  # in Prefect, never on the stream
            await until(lambda: state.views["r"].record.status == RunStatus.COMPLETED,
                        "the run's end, read back")
            await asyncio.sleep(1.0)  # two more quiet periods: the run has ended, no read
            assert source.recalled == ["r"]

    asyncio.run(main())
