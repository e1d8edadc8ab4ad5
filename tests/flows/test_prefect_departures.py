"""planrun's flow runs without Prefect's per-run suspension observer (a thread, an API
client and an event subscription per run of a deployment: flows/prefect_compat.py); any
other flow keeps it. planrun's own control notices a suspension from outside instead."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import prefect.flow_engine
import pytest
from prefect import flow
from prefect._flow_run_suspension import _active_flow_run_suspension_requests as active
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import AsyncFlowRunEngine

from planrun.flows.plan_flow import plan_flow


@flow(name="someone-elses-flow")
async def other() -> None:
    return None


def observers_started(monkeypatch: pytest.MonkeyPatch, the_flow: Any) -> list[uuid.UUID]:
    """The runs Prefect's observer was started for, entering the engine's suspension setup
    of a run of ``the_flow`` that belongs to a deployment."""
    started: list[uuid.UUID] = []

    @contextmanager
    def observe(flow_run_id: uuid.UUID, request: Any, polling_interval: float = 10
                ) -> Iterator[None]:
        started.append(flow_run_id)
        yield

    monkeypatch.setattr(prefect.flow_engine, "observe_flow_run_suspension", observe)
    run = FlowRun(flow_id=uuid.uuid4(), deployment_id=uuid.uuid4())
    engine = AsyncFlowRunEngine(flow=the_flow, flow_run=run)
    with engine.setup_flow_run_suspension_request() as request:
        assert active[run.id] is request
    assert run.id not in active
    return started


def test_planruns_flow_runs_without_prefects_suspension_observer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert observers_started(monkeypatch, plan_flow) == []


def test_another_flow_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(observers_started(monkeypatch, other)) == 1
