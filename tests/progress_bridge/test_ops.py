"""Health, Prometheus metrics and the OpenAPI page of a real bridge."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from planrun.contract.stream import Draft
from planrun.progress_bridge.app import watch_loop
from planrun.progress_bridge.commit import Committer
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.state import BridgeState
from tests.stack import free_port

from .clients import receive_until
from .conftest import BridgeFactory, ServedBridge, wait_for
from .events import ended


def test_healthz_and_docs(bridge: ServedBridge) -> None:
    with httpx.Client(base_url=bridge.http, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok", "clients": 0, "runs": 0}
        docs = http.get("/docs", params={"token": bridge.token})
        assert docs.status_code == 200
        assert f"/openapi.json?token={bridge.token}" in docs.text  # the page can load it
        spec = http.get("/openapi.json", headers=bridge.auth).json()
        assert {"/healthz", "/metrics", "/v1/runs/{run_id}/events"} <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["token"]["scheme"] == "bearer"


def test_metrics_count_clients_and_messages(bridge: ServedBridge) -> None:
    async def main() -> str:
        async with connect(bridge.ws_url("r"), proxy=None) as ws:
            wait_for(lambda: bridge.hub.subscribers("r") == 1, 5, "the client")
            for i in range(1, 4):
                await bridge.emit("r", i)
            await bridge.push(ended("r", 4))
            await receive_until(ws, 4)
            async with httpx.AsyncClient(base_url=bridge.http, headers=bridge.auth) as http:
                return (await http.get("/metrics")).text

    text = asyncio.run(main())
    assert 'planrun_bridge_clients{transport="ws"} 1.0' in text
    assert 'planrun_bridge_messages_sent_total{transport="ws"} 4.0' in text
    assert "planrun_bridge_messages_published_total 4.0" in text
    assert 'planrun_steps_total{status="completed"} 2.0' in text  # after run.started
    assert 'planrun_step_duration_seconds_count{tool="core.echo"} 2.0' in text
    assert 'planrun_runs_total{status="completed"} 1.0' in text
    assert "planrun_bridge_slow_disconnects_total 0.0" in text


def test_gc_is_frozen_after_start_up(bridge_factory: BridgeFactory) -> None:
    before = gc.get_freeze_count()
    try:
        bridge_factory(freeze_gc=True)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_the_upstream_runs_with_the_bridge_state_for_the_apps_lifetime(
        bridge_factory: BridgeFactory) -> None:
    stopped = asyncio.Event()

    async def upstream(state: BridgeState) -> None:
        Committer(state).commit("r", RunView.unstarted("r"),
                                [Draft(type="run.started", status="running")])
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    bridge = bridge_factory(upstream=upstream)

    async def main() -> None:
        async with connect(bridge.ws_url("r", after=0), proxy=None) as ws:
            assert (await receive_until(ws, 1))[0]["type"] == "run.started"

    asyncio.run(main())
    bridge.stop()
    assert stopped.is_set()


def test_a_loop_that_stood_still_is_logged_with_how_long(
        caplog: pytest.LogCaptureFixture) -> None:
    """The stall is measured, not assumed: a loaded machine may stretch it, never shorten
    it; a watch whose threshold is far above any scheduling delay sees the waits between
    its turns as none."""
    async def main() -> float:
        calm = asyncio.ensure_future(watch_loop(every_s=0.05, warn_s=5.0))
        watch = asyncio.ensure_future(watch_loop(every_s=0.05, warn_s=1.0))
        await asyncio.sleep(0.2)  # both have run a few turns
        began = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251 - the stall under test
        stalled = time.monotonic() - began
        await asyncio.sleep(0.2)
        calm.cancel()
        watch.cancel()
        return stalled

    with caplog.at_level(logging.WARNING, logger="planrun.bridge"):
        stalled = asyncio.run(main())
    stood = [float(r.getMessage().split("stood still for ")[1].split(" s")[0])
             for r in caplog.records]
    # one warning, for the stall; "%.1f" rounds, and the watch's own turn adds up to 0.05 s
    assert len(stood) == 1 and stalled - 0.1 <= stood[0] <= stalled + 0.5, (stood, stalled)


FAILING_UPSTREAM = """
import sys
from planrun.progress_bridge import __main__ as bridge
from planrun.progress_bridge.upstream import PrefectUpstream

async def fails(self, state):
    raise RuntimeError("what nothing foresaw")

PrefectUpstream.__call__ = fails
bridge.main(sys.argv[1:])
"""


def test_a_bridge_whose_upstream_fails_says_why_and_exits_1_to_be_started_again(
        tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-c", FAILING_UPSTREAM, "--port", str(port), "--data", str(tmp_path)],
        env={**os.environ, "PLANRUN_TOKEN": "t" * 32}, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 1, done.stderr
    assert "the bridge stopped following Prefect: RuntimeError: what nothing foresaw" \
        in done.stderr


def test_a_bridge_with_no_prefect_server_to_follow_says_so_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-m", "planrun.progress_bridge", "--port", str(free_port()),
         "--data", str(tmp_path / "data")],
        env={**env, "PLANRUN_TOKEN": "t" * 32, "PREFECT_HOME": str(tmp_path / "prefect")},
        capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (
        2, "planrun bridge: no Prefect server to follow: set PREFECT_API_URL (`planrun up` "
           "starts the bridge with it; docs/production.md)\n")
