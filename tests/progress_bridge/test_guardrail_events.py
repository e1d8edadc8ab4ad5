"""Guardrail events through a real Prefect server to a WebSocket client: the bridge's real
upstream reads a breaker's Prefect Variable as it starts, and follows the breakers' events
(sent by the engine's own emitter, ``flows/breakers.py``) and a run's events, emitted here
with Prefect's ``emit_event`` as the engine does (its limits side, which sends
``planrun.step.waiting``, is built beside the bridge)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from planrun.contract.events import (
    RESOURCE_PREFIX,
    Payload,
    PlanStep,
    RunStarted,
    StepChanged,
    StepWaiting,
    step_event,
)
from planrun.contract.status import StepStatus
from planrun.flows.breaker_store import PrefectStore
from planrun.flows.breakers import BreakerView, State, emit_breaker_event, variable_name
from planrun.policy import BreakerSettings
from planrun.progress_bridge.upstream import PrefectUpstream, UpstreamSettings

from .conftest import BridgeFactory, ServedBridge, wait_for

SETTINGS = UpstreamSettings(lookback_s=30.0, margin_s=30.0, settle_s=6.0, grace_s=1.0,
                            history=False, ticks=False)
BREAKER = BreakerSettings.model_validate({})


def emit(run_id: str, name: str, payload: Payload) -> None:
    """A run's event as the engine sends it (``flows/events.py``)."""
    from prefect.events import emit_event

    emit_event(name, resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{run_id}"},
               payload=payload.model_dump(mode="json"))


@pytest.fixture
def known_open() -> Iterator[BreakerView]:
    """A breaker open before the bridge starts, in its Prefect Variable (a tool of its own,
    so no other test's breaker events reach this test's run)."""
    view = BreakerView(key=f"probe-{uuid.uuid4().hex[:8]}.tool", state=State.OPEN, epoch=1,
                       failures=5, window_s=60.0, probe_at=time.time() + 600, opened_total=1)
    store = PrefectStore()
    asyncio.run(store.write(variable_name(view.key), view.to_value()))
    yield view
    asyncio.run(store.delete(variable_name(view.key)))


async def follow(bridge: ServedBridge, run_id: str,
                 until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with connect(bridge.ws_url(run_id), proxy=None) as ws:
        async with asyncio.timeout(30):
            while not until(got):
                message = json.loads(await ws.recv())
                if message["type"] != "heartbeat":
                    got.append(message)
    return got


def test_breakers_and_waiting_steps_reach_a_client_through_prefect(
        bridge_factory: BridgeFactory, tmp_path: Path, known_open: BreakerView) -> None:
    upstream = PrefectUpstream(SETTINGS)
    bridge = bridge_factory(tmp_path, upstream=upstream)
    wait_for(upstream.connected.is_set, 30, "the upstream to subscribe")
    wait_for(lambda: known_open.key in bridge.state.breakers.latest, 30,
             "the bridge to read the open breaker's Variable")
    failing = f"probe-{uuid.uuid4().hex[:8]}.tool"
    run_id = str(uuid.uuid4())
    emit(run_id, "planrun.run.started", RunStarted(
        run_id=run_id, n=1, plan="guarded",
        steps=[PlanStep(id="find", tool=failing), PlanStep(id="old", tool=known_open.key)]))

    told = asyncio.run(follow(bridge, run_id, lambda got: len(got) >= 2))
    assert [(m["seq"], m["type"], m.get("tool")) for m in told] == [
        (1, "run.started", None), (2, "tool.circuit_opened", known_open.key)]
    assert told[1]["note"].startswith(f"{known_open.key} is failing in every run (5 in 60 s)")

    emit(run_id, "planrun.step.waiting", StepWaiting(
        run_id=run_id, n=2, step_id="find", why="rate", note=f"waiting: {failing} allows "
        "1 call a second"))
    opened = BreakerView(key=failing, state=State.OPEN, epoch=1, failures=5, window_s=60.0,
                         probe_at=time.time() + 30, run_id=run_id, opened_total=1)
    emit_breaker_event(opened, BREAKER)
    emit_breaker_event(BreakerView(key=failing, state=State.HALF_OPEN, epoch=1,
                                   run_id=run_id, opened_total=1), BREAKER)
    emit_breaker_event(BreakerView(key=failing, state=State.CLOSED, epoch=1, run_id=run_id,
                                   opened_total=1), BREAKER)
    got = asyncio.run(follow(bridge, run_id, lambda got: len(got) >= 6))

    assert [m["seq"] for m in got] == list(range(1, 7))
    circuits = [(m["type"], m["status"]) for m in got if m.get("tool") == failing]
    assert circuits == [("tool.circuit_opened", "open"), ("tool.circuit_half_open", "half_open"),
                        ("tool.circuit_closed", "closed")]
    assert next(m for m in got if m.get("tool") == failing)["note"].startswith(
        f"{failing} is failing in every run (5 in 60 s); the next try is at ")
    wait = next(m for m in got if m["type"] == "step.waiting")
    assert (wait["step_id"], wait["status"], wait["note"]) == (
        "find", "pending", f"waiting: {failing} allows 1 call a second")
    report = httpx.get(f"{bridge.http}/v1/runs/{run_id}", headers=bridge.auth, timeout=10)
    assert report.json()["steps"]["find"]["note"] == wait["note"]

    # Read again from Prefect's API: every event of this run is known, so nothing of it is
    # told twice. (The count reconcile returns also holds other tests' runs on this server.)
    async def reconcile() -> int:
        return await bridge.call(upstream.reconcile())

    asyncio.run(reconcile())
    assert bridge.state.store.last_seq(run_id) == 6
    emit(run_id, step_event(StepStatus.RUNNING), StepChanged(
        run_id=run_id, n=3, step_id="find", status=StepStatus.RUNNING, attempt=1))
    running = asyncio.run(follow(bridge, run_id, lambda got: len(got) >= 7))
    assert [(m["seq"], m["type"]) for m in running[6:]] == [(7, "step.running")]
    report = httpx.get(f"{bridge.http}/v1/runs/{run_id}", headers=bridge.auth, timeout=10)
    assert "note" not in report.json()["steps"]["find"]
