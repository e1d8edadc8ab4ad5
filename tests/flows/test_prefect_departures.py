"""Departures from Prefect's defaults that cost a run at its start (flows/prefect_compat.py):
planrun's flow runs without Prefect's per-run suspension observer (a thread, an API client
and an event subscription per run of a deployment; planrun's own control notices a
suspension from outside), any other flow keeps it; and the server's default result
storage is read once a minute, not at every run's start."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import prefect.flow_engine
import pytest
from prefect import flow
from prefect._flow_run_suspension import _active_flow_run_suspension_requests as active
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import AsyncFlowRunEngine

from planrun.flows import prefect_compat
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


class Reads:
    """Counts reads of the server's default result storage; fails them while ``failing``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from prefect.client.orchestration import PrefectClient, SyncPrefectClient

        self.count = 0
        self.failing = False
        sync_read = SyncPrefectClient.read_server_default_result_storage
        async_read = PrefectClient.read_server_default_result_storage

        def counted(client: Any) -> Any:
            self.count += 1
            if self.failing:
                raise httpx.ConnectError("the server is away")
            return sync_read(client)

        async def acounted(client: Any) -> Any:
            self.count += 1
            return await async_read(client)

        monkeypatch.setattr(SyncPrefectClient, "read_server_default_result_storage", counted)
        monkeypatch.setattr(PrefectClient, "read_server_default_result_storage", acounted)
        monkeypatch.setattr(prefect_compat._ServerStorage, "read_at", None)


def test_the_servers_default_result_storage_is_read_once_a_minute(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.results

    reads = Reads(monkeypatch)
    first = prefect.results._read_server_default_result_storage_block_id()
    again = prefect.results._read_server_default_result_storage_block_id()
    also = asyncio.run(prefect.results._aread_server_default_result_storage_block_id())
    assert reads.count == 1 and first == again == also
    monkeypatch.setattr(prefect_compat._ServerStorage, "read_at",
                        time.monotonic() - prefect_compat.STORAGE_READ_S - 1)
    prefect.results._read_server_default_result_storage_block_id()
    assert reads.count == 2  # a minute later: read again


def test_a_failed_read_of_it_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.results

    reads = Reads(monkeypatch)
    reads.failing = True
    assert prefect.results._read_server_default_result_storage_block_id() is None
    reads.failing = False
    prefect.results._read_server_default_result_storage_block_id()
    prefect.results._read_server_default_result_storage_block_id()
    assert reads.count == 2  # read again after the failure, then kept
