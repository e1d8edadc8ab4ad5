"""Guardrails through a real bridge under uvicorn, its upstream fed by the fake event
source: a breaker's change reaches the WebSocket and SSE clients of every run that uses
its tool, once; a waiting step's note reaches the stream and the report; a full queue or a
machine short of memory answers ``POST /v1/runs`` with 503 and Retry-After."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect

from planrun.contract.breakers import BreakerChange
from planrun.contract.events import PlanStep, RunStarted, StepWaiting
from planrun.progress_bridge.admission import Admission
from planrun.progress_bridge.apply import BreakerChanged, RunEvent
from planrun.progress_bridge.source import FakeEventSource
from planrun.progress_bridge.upstream import Upstream

from .clients import read_sse_until, receive_until
from .conftest import QUIET, BridgeFactory, ServedBridge, wait_for
from .events import T0, ended, started, step_done

OPENED = BreakerChange(key="search.web", state="open", epoch=1, failures=5, window_s=60.0,
                       probe_at=time.time() + 3600, opened_total=4,
                       message="search.web is failing in every run (5 in 60 s); the next "
                               "try is at 14:02:10")
CLOSED = OPENED.model_copy(update={"state": "closed", "probe_at": None,
                                   "message": "search.web works again"})
PLAN = {"version": 1, "name": "p", "steps": [{"id": "a", "tool": "core.echo",
                                              "with": {"value": "hi"}}]}


def run_of(run_id: str, *tools: str) -> RunEvent:
    """``planrun.run.started`` of a run with one step per tool."""
    steps = [PlanStep(id=f"s{i}", tool=tool) for i, tool in enumerate(tools)]
    return RunEvent(f"{run_id}-1", "planrun.run.started", run_id, T0,
                    RunStarted(run_id=run_id, n=1, plan="p", steps=steps))


def fed(factory: BridgeFactory, known: list[BreakerChange] | None = None,
        **options: Any) -> ServedBridge:
    """A bridge whose fake source knows ``known`` breakers as the bridge starts."""
    source = FakeEventSource(known)
    bridge = factory(upstream=Upstream(source, QUIET), **options)
    bridge.source = source
    return bridge


def test_a_breaker_change_reaches_every_run_using_its_tool_once(
        bridge_factory: BridgeFactory) -> None:
    bridge = fed(bridge_factory)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        assert await bridge.push(run_of("uses", "core.echo", "search.web"))
        assert await bridge.push(run_of("other", "core.echo"))
        assert await bridge.push(run_of("done", "search.web"))
        assert await bridge.push(ended("done", 2))
        before = {r: bridge.store.last_seq(r) for r in ("uses", "other", "done")}
        async with connect(bridge.ws_url("uses", after=1), proxy=None) as ws, \
                httpx.AsyncClient(base_url=bridge.http, headers=bridge.auth,
                                  timeout=10) as http, \
                http.stream("GET", "/v1/runs/uses/events?after=1") as sse:
            wait_for(lambda: bridge.hub.subscribers("uses") == 2, 5, "two clients")
            assert await bridge.push(BreakerChanged("b-1", T0 + 10, OPENED))
            assert not await bridge.push(BreakerChanged("b-1", T0 + 10, OPENED))  # again
            # The same change under another id (two paths to one event): nothing new.
            assert await bridge.push(BreakerChanged("b-1-copy", T0 + 10, OPENED))
            assert {r: bridge.store.last_seq(r) for r in ("other", "done")} == {
                r: before[r] for r in ("other", "done")}
            assert bridge.store.last_seq("uses") == 2
            assert await bridge.push(BreakerChanged("b-2", T0 + 20, CLOSED))
            got = await receive_until(ws, 3)
            streamed = await read_sse_until(sse, 3)
        return got, streamed

    got, streamed = asyncio.run(main())
    assert [(m["seq"], m["type"], m["status"], m["tool"], m["note"]) for m in got] == [
        (2, "tool.circuit_opened", "open", "search.web", OPENED.message),
        (3, "tool.circuit_closed", "closed", "search.web", "search.web works again")]
    assert got[0]["ts"] == "2026-01-01T00:00:10.000Z" and got[0]["step_id"] is None
    assert got[0]["progress"] == {"done": 0, "total": 2, "percent": 0.0}
    assert [(e["id"], e["event"]) for e in streamed] == [("2", "tool.circuit_opened"),
                                                          ("3", "tool.circuit_closed")]
    assert json.loads(streamed[0]["data"]) == got[0]
    metrics = httpx.get(f"{bridge.http}/metrics", headers=bridge.auth, timeout=10).text
    assert 'planrun_breaker_state{breaker="search.web"} 0.0' in metrics
    assert 'planrun_breaker_opened_total{breaker="search.web"} 4.0' in metrics


def test_a_run_that_starts_while_a_breaker_is_open_is_told_at_once(
        bridge_factory: BridgeFactory) -> None:
    host = BreakerChange(key="http.request@api.example.org", state="open", epoch=2,
                         failures=3, window_s=30.0, probe_at=T0 - 1)  # its cool-down passed
    bridge = fed(bridge_factory, known=[host, CLOSED])
    wait_for(lambda: bool(bridge.state.breakers.latest), 5, "the breakers' state to be read")

    async def main() -> list[Any]:
        assert await bridge.push(run_of("late", "http.request", "search.web"))
        return await bridge.call(bridge.store.after("late", 0))

    messages = asyncio.run(main())
    assert [(m.seq, m.type) for m in messages] == [(1, "run.started"),
                                                   (2, "tool.circuit_opened")]
    told = json.loads(messages[1].wire)
    assert (told["tool"], told["status"]) == ("http.request@api.example.org", "open")
    assert told["note"] == ("http.request@api.example.org is failing in every run (3 in 30 s); "
                            "its next call is a trial")
    metrics = httpx.get(f"{bridge.http}/metrics", headers=bridge.auth, timeout=10).text
    assert 'planrun_breaker_state{breaker="http.request@api.example.org"} 2.0' in metrics


def test_a_waiting_step_reaches_the_stream_and_the_report_until_it_starts(
        bridge: ServedBridge) -> None:
    async def main() -> list[dict[str, Any]]:
        async with connect(bridge.ws_url("r"), proxy=None) as ws:
            await bridge.push(started("r"))
            await bridge.push(RunEvent("r-2", "planrun.step.waiting", "r", T0 + 2, StepWaiting(
                run_id="r", n=2, step_id="s1", why="slot",
                note="waiting for a core.echo slot, 3 ahead")))
            got = await receive_until(ws, 2)
        return got

    got = asyncio.run(main())
    assert (got[1]["type"], got[1]["step_id"], got[1]["status"], got[1]["note"]) == (
        "step.waiting", "s1", "pending", "waiting for a core.echo slot, 3 ahead")
    report = httpx.get(f"{bridge.http}/v1/runs/r", headers=bridge.auth, timeout=10).json()
    assert report["steps"]["s1"]["note"] == "waiting for a core.echo slot, 3 ahead"
    metrics = httpx.get(f"{bridge.http}/metrics", headers=bridge.auth, timeout=10).text
    assert 'planrun_steps_waiting{why="slot"} 1.0' in metrics

    asyncio.run(bridge.push(step_done("r", 3)))  # s3 completes; s1 still waits
    asyncio.run(bridge.push(step_done("r", 21)))  # s1 ran and completed
    report = httpx.get(f"{bridge.http}/v1/runs/r", headers=bridge.auth, timeout=10).json()
    assert "note" not in report["steps"]["s1"]
    assert report["steps"]["s1"]["status"] == "completed"


class Submitted:
    """A ``submit`` that starts nothing and names its runs ``q-1``, ``q-2``..."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, plan: dict[str, Any], inputs: dict[str, Any]) -> str:
        self.count += 1
        return f"q-{self.count}"


def test_a_full_queue_answers_503_with_retry_after_until_a_run_starts(
        bridge_factory: BridgeFactory) -> None:
    submit = Submitted()
    bridge = bridge_factory(submit=submit, admission=Admission(max_queued=1))

    def post() -> httpx.Response:
        return httpx.post(f"{bridge.http}/v1/runs", json={"plan": PLAN}, headers=bridge.auth,
                          timeout=10)

    assert post().status_code == 201
    refused = post()
    assert refused.status_code == 503
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    body = refused.json()
    assert body["reason"] == "queue_full"
    assert body["retry_after_s"] == int(refused.headers["retry-after"])
    assert body["detail"].startswith("the queue is full: 1 run(s) wait to start (the limit "
                                     "is 1); try again in ")
    assert submit.count == 1  # refused before anything was started

    asyncio.run(bridge.push(started("q-1")))  # the queued run starts: there is room again
    assert post().status_code == 201
    metrics = httpx.get(f"{bridge.http}/metrics", headers=bridge.auth, timeout=10).text
    assert 'planrun_bridge_runs_refused_total{reason="queue_full"} 1.0' in metrics
    assert "planrun_runs_queued 1.0" in metrics


def test_a_machine_over_its_memory_threshold_answers_503(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(submit=Submitted(), admission=Admission(max_memory_percent=0))
    refused = httpx.post(f"{bridge.http}/v1/runs", json={"plan": PLAN}, headers=bridge.auth,
                         timeout=10)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "30"
    assert refused.json()["reason"] == "memory"
    assert "the machine is short of memory" in refused.json()["detail"]


class Unavailable(http.server.BaseHTTPRequestHandler):
    """A Prefect server under SQLite lock contention: every request gets 503."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(503, "Service Unavailable")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_run_prefect_cannot_create_answers_503_with_retry_after_and_no_traceback(
        bridge_factory: BridgeFactory) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    targets = [f"http://127.0.0.1:{server.server_address[1]}/api/deployments/d/create_flow_run",
               f"http://127.0.0.1:{closed.getsockname()[1]}/api"]

    async def create_flow_run(plan: dict[str, Any], inputs: dict[str, Any]) -> str:
        async with httpx.AsyncClient() as client:  # as Prefect's client, after its retries
            (await client.post(targets.pop(0), json={})).raise_for_status()
        return "never"

    try:
        bridge = bridge_factory(submit=create_flow_run)
        answers = [httpx.post(f"{bridge.http}/v1/runs", json={"plan": PLAN},
                              headers=bridge.auth, timeout=10) for _ in range(2)]
    finally:
        server.shutdown()
        server.server_close()
        closed.close()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["reason"] == "prefect_unavailable"
    assert answers[0].json()["detail"] == ("the Prefect server answered 503 Service "
                                           "Unavailable, so the run was not started; try "
                                           "again in 5 s")
    assert answers[1].json()["detail"].startswith("the Prefect server could not be reached "
                                                  "(ConnectError)")
    metrics = httpx.get(f"{bridge.http}/metrics", headers=bridge.auth, timeout=10).text
    assert 'planrun_bridge_runs_refused_total{reason="prefect_unavailable"} 2.0' in metrics
