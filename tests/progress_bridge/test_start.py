"""A bridge's first start on a Prefect server with a long history of ended runs: it reads
the runs in flight, not the history, serves them whole, and still serves a run that ended
before it started, read from Prefect when a client asks for it. Real Prefect server, the
bridge under uvicorn, real WebSocket and HTTP clients."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from planrun.adapters.workspace import default_workspace_root
from planrun.contract.status import StepStatus
from planrun.progress_bridge import prefect_source
from planrun.progress_bridge.upstream import PrefectUpstream, UpstreamSettings
from planrun.runner import run_plan
from tests.helpers import plan_data, run_yaml

from .conftest import BridgeFactory, ServedBridge, wait_for
from .ended_runs import copy_ended_run, run_events
from .events import nth
from .test_upstream import by_type, follow

#: The default lookback (an hour): the history below is younger, so a bridge that read
#: the last hour would read all of it. The default settle_s too: the second start read
#: must come after Prefect's persister has flushed (every 5 s) what the first missed.
SETTINGS = UpstreamSettings(settle_s=6.0, tick_s=0.5, grace_s=1.0)
#: Copies of an ended run's events in the server's history (≈ 8 events each).
COPIES = 150

ENDED = """
version: 1
name: start-ended
steps:
  - {id: a, tool: core.echo, with: {value: 1}}
  - {id: b, tool: core.echo, needs: [a], with: {value: 2}}
"""

def going_plan(go: str) -> str:
    """A run whose step b ends only once the file ``go`` exists in the workspace: the test
    makes it after the bridge has subscribed, so b's end is not an event that occurred
    before the subscription and was not stored yet (docs/architecture.md: such an event
    comes late)."""
    return f"""
version: 1
name: start-going
steps:
  - {{id: a, tool: core.sleep, with: {{seconds: 0.5}}}}
  - {{id: b, tool: shell.run, needs: [a], with: {{argv: [sh, -c, "until [ -e {go} ]; do sleep 0.05; done"]}}}}
  - {{id: c, tool: core.sleep, needs: [b], with: {{seconds: 1.5}}}}
  - {{id: d, tool: core.sleep, needs: [c], with: {{seconds: 1.5}}}}
"""


@dataclass(frozen=True)
class History:
    real: list[str]  # runs that really ran and ended
    copies: list[str]  # their events again under new ids: runs with no flow run

    @property
    def ended(self) -> set[str]:
        return {*self.real, *self.copies}


@pytest.fixture(scope="module")
def history() -> History:
    real = [run_yaml(ENDED)["run_id"] for _ in range(2)]
    ended_at = time.time()
    made = History(real, asyncio.run(copy_ended_run(real[0], COPIES)))
    # A bridge's reads may reach settle_s before its start (the window of Prefect's
    # stream, a reconciliation after a gap), and its start reads the runs that ended
    # within two settle_s of it: the history must be older than that.
    wait_for(lambda: time.time() - ended_at > 2 * SETTINGS.settle_s + 1, 60,
             "the history to age")
    return made


class Going:
    """Tells the run's id and when its first step has completed."""

    def __init__(self) -> None:
        self.run_id = ""
        self.first_done = asyncio.Event()

    def changed(self, run: Any, step: Any) -> None:
        self.run_id = run.run_id
        if step is not None and step.status == StepStatus.COMPLETED:
            self.first_done.set()


async def stored(run_id: str, name: str, step_id: str, timeout: float) -> None:
    """Wait until Prefect's API has the run's event ``name`` about ``step_id``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(e.event == name and e.payload.get("step_id") == step_id
                  for e in await run_events(run_id)):
        assert asyncio.get_running_loop().time() < deadline, f"{name} of {step_id} not stored"
        await asyncio.sleep(0.1)


def fresh_bridge(factory: BridgeFactory, directory: Path, **options: Any) -> ServedBridge:
    """A bridge with the real upstream over a new message log, once it is connected."""
    upstream = PrefectUpstream(SETTINGS)
    bridge = factory(directory, upstream=upstream, **options)
    wait_for(upstream.connected.is_set, 30, "the upstream to subscribe")
    return bridge


def test_a_fresh_bridge_serves_a_run_in_flight_whole_and_reads_no_ended_run(
        bridge_factory: BridgeFactory, tmp_path: Path, history: History) -> None:
    async def main() -> tuple[ServedBridge, str, dict[str, Any], list[dict[str, Any]]]:
        going = Going()  # run in this loop, as ``planrun run`` runs it
        name = f"start-going-{uuid.uuid4().hex}.go"
        go = default_workspace_root() / name
        run = asyncio.ensure_future(run_plan(plan_data(going_plan(name)), {}, going))
        await asyncio.wait_for(going.first_done.wait(), 60)
        # The run's events so far are stored in Prefect (its persister lags by up to 5 s):
        # an event that occurred before the bridge subscribed and is not stored yet would
        # reach it only with the second start read, after the later ones.
        await stored(going.run_id, "planrun.step.running", "b", 30)
        bridge = await asyncio.to_thread(fresh_bridge, bridge_factory, tmp_path / "bridge")
        go.touch()
        try:
            got = await follow(bridge, going.run_id, timeout=60)
        finally:
            go.unlink()
        return bridge, going.run_id, await run, got

    bridge, run_id, report, got = asyncio.run(main())
    upstream: PrefectUpstream = bridge.upstream
    assert report["status"] == "completed"
    assert [m["seq"] for m in got] == list(range(1, len(got) + 1))
    assert got[0]["type"] == "run.started" and got[-1]["type"] == "run.completed"
    assert [m["step_id"] for m in by_type(got, "step.completed")] == ["a", "b", "c", "d"], [
        (m["type"], m["step_id"], m["ts"]) for m in got]
    # Both start reads (at connect, and once Prefect's persister has flushed) are over.
    wait_for(lambda: upstream.start_reads >= 2, 30, "the second start read")
    assert upstream.read[run_id] > 0, "the run in flight was read at start"
    assert not set(upstream.read) & history.ended, "an ended run's events were read"
    assert not set(bridge.state.views) & history.ended


def test_a_run_that_ended_before_the_bridge_started_is_served_whole(
        bridge_factory: BridgeFactory, tmp_path: Path, history: History) -> None:
    bridge = fresh_bridge(bridge_factory, tmp_path / "bridge")
    upstream: PrefectUpstream = bridge.upstream
    first, second = history.real
    assert first not in upstream.read and second not in upstream.read

    report = httpx.get(f"{bridge.http}/v1/runs/{first}", headers=bridge.auth, timeout=30)
    assert report.status_code == 200, report.text
    assert report.json()["status"] == "completed"
    got = asyncio.run(follow(bridge, first))
    assert [m["seq"] for m in got] == list(range(1, report.json()["last_seq"] + 1))
    assert got[0]["type"] == "run.started" and got[-1]["type"] == "run.completed"
    assert [m["step_id"] for m in by_type(got, "step.completed")] == ["a", "b"]

    # A stream asked first (no report before it) gets the whole run too.
    streamed = asyncio.run(follow(bridge, second))
    assert [m["type"] for m in streamed] == [m["type"] for m in got]
    assert set(upstream.read) & history.ended == {first, second}


def test_a_run_prefect_does_not_know_is_404_and_its_stream_waits_for_it(
        bridge_factory: BridgeFactory, tmp_path: Path, history: History) -> None:
    bridge = fresh_bridge(bridge_factory, tmp_path / "bridge", heartbeat_s=0.2)
    with httpx.Client(base_url=bridge.http, headers=bridge.auth, timeout=30) as http:
        for run_id in (str(uuid.uuid4()), "not-a-run", history.copies[0]):
            answer = http.get(f"/v1/runs/{run_id}")
            assert answer.status_code == 404, answer.text
            assert "no run" in answer.json()["detail"]

    async def first_message() -> dict[str, Any]:
        async with connect(bridge.ws_url(str(uuid.uuid4())), proxy=None) as ws:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), 30)))

    assert asyncio.run(first_message())["type"] == "heartbeat"


def test_an_event_of_a_run_not_seen_starting_waits_for_the_run_to_be_read(
        bridge: ServedBridge) -> None:
    """A fake source: events 1 and 2 are in Prefect but were not seen live; event 3 comes
    live first, before Prefect has stored it (so reading the run does not bring it). It is
    held while the run is read, then applied after 1 and 2."""
    run_id = str(uuid.uuid4())

    async def live() -> bool:
        bridge.source.pushed.extend([nth(run_id, 1), nth(run_id, 2)])
        deliver = bridge.source._deliver
        assert deliver is not None
        return deliver(nth(run_id, 3))

    async def main() -> bool:
        return await bridge.call(live())

    assert asyncio.run(main()) is False, "event 3 was applied before the run was read"
    wait_for(lambda: bridge.store.last_seq(run_id) >= 3, 10, "the run's three messages")

    async def stored() -> list[Any]:
        return await bridge.call(bridge.store.after(run_id, 0))

    messages = asyncio.run(stored())
    assert [m.seq for m in messages] == [1, 2, 3]
    assert messages[0].type == "run.started"
    assert [(m.step_id, m.summary) for m in messages[1:]] == [("s2", "event 2"),
                                                              ("s3", "event 3")]
    assert bridge.source.recalled == [run_id]


def test_the_bridge_serves_while_prefects_client_is_imported(
        bridge_factory: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing Prefect's client takes 1–3 s: it runs in a thread, not on the bridge's
    loop, so the bridge answers /healthz meanwhile, and follows Prefect once it is done."""
    release = threading.Event()
    importing: list[int] = []

    def slow_import() -> None:
        importing.append(threading.get_ident())
        assert release.wait(30), "the test did not let the import end"

    monkeypatch.setattr(prefect_source, "_import_prefect", slow_import)
    upstream = PrefectUpstream(SETTINGS)
    bridge = bridge_factory(tmp_path / "bridge", upstream=upstream)
    try:
        wait_for(lambda: importing, 10, "the import to start")
        assert importing[0] != bridge._thread.ident, "Prefect imported on the bridge's loop"
        assert httpx.get(f"{bridge.http}/healthz", timeout=5).status_code == 200
        assert not upstream.connected.is_set()
    finally:
        release.set()
    wait_for(upstream.connected.is_set, 30, "the upstream to subscribe")


def test_the_bridge_loads_the_tools_off_its_loop_before_a_plan_is_submitted(
        bridge_factory: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan is checked against the registry of tools, whose imports take seconds under
    load: the bridge loads it as it starts, in a thread, so the first submit does not wait
    for it with the loop blocked, and the bridge answers meanwhile."""
    from planrun.progress_bridge import app

    release = threading.Event()
    loading: list[int] = []

    def slow_registry() -> None:
        loading.append(threading.get_ident())
        assert release.wait(30), "the test did not let the load end"

    monkeypatch.setattr(app, "default_registry", slow_registry)
    bridge = bridge_factory(tmp_path / "bridge")
    try:
        wait_for(lambda: loading, 10, "the tools to be loaded")
        assert loading[0] != bridge._thread.ident, "the tools loaded on the bridge's loop"
        assert httpx.get(f"{bridge.http}/healthz", timeout=5).status_code == 200
    finally:
        release.set()
