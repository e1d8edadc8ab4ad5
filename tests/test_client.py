"""The CLI's bridge client (``submit``/``status``/``watch``/``pause``/``approve``) against a
canned bridge on 127.0.0.1: what a person sees, and the exit code, when the bridge
answers, refuses, or is not there."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from planrun import bridge_token, client
from planrun.cli import main
from planrun.contract.estimate import Estimate
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.times import epoch
from planrun.errors import PlanrunError
from planrun.report import RunRecord, StepRecord

PLAN = """\
version: 1
name: hello
steps:
  - id: greet
    tool: core.echo
    with: {value: hi}
"""


@dataclass
class Canned:
    """One answer of the canned bridge: status, body (JSON unless ``raw``)."""

    status: int
    body: Any = None
    raw: bool = False


@dataclass
class FakeBridge:
    answers: dict[tuple[str, str], Canned] = field(default_factory=dict)
    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def bridge(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBridge]:
    fake = FakeBridge()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            fake.seen.append((self.command, self.path, dict(self.headers), body))
            canned = fake.answers.get((self.command, self.path), Canned(404, {"detail": "?"}))
            data = canned.body.encode() if canned.raw else json.dumps(canned.body).encode()
            self.send_response(canned.status)
            self.send_header("Content-Type", "text/plain" if canned.raw else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PLANRUN_BRIDGE_URL", fake.url + "/")
    monkeypatch.setenv("PLANRUN_TOKEN", "t0ken-for-tests")
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _report(**extra: Any) -> dict[str, Any]:
    return {"run_id": "r1", "plan": "hello", "status": "running",
            "progress": {"done": 1, "total": 3, "percent": 33.3},
            "estimate": {"remaining_s": 12.0, "low_s": 9.0, "high_s": 18.0, "early_by_s": 2.0},
            "steps": {
                "greet": {"status": "completed", "tool": "core.echo", "attempts": 1,
                          "duration_s": 0.25},
                "fetch": {"status": "retrying", "tool": "http.request", "attempts": 2,
                          "duration_s": None,
                          "error": {"category": "transient", "message": "reset"}},
                "ship": {"status": "skipped", "tool": "shell.run", "attempts": 0,
                         "reason": "rejected"},
            },
            "prefect_url": "http://127.0.0.1:4200/runs/flow-run/abc", **extra}


def test_status_prints_the_run_its_estimate_each_step_and_the_prefect_link(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, _report())
    assert main(["status", "r1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run r1 (hello): running, 1/3 steps"
    assert lines[1] == "about 12.0s left (9.0s–18.0s), 2.0s ahead of the first estimate"
    assert lines[2].split() == ["greet", "completed", "1", "0.25s"]
    assert lines[3].split() == ["fetch", "retrying", "2", "transient:", "reset"]
    assert lines[4].split() == ["ship", "skipped", "rejected"]
    assert lines[5] == "Prefect UI: http://127.0.0.1:4200/runs/flow-run/abc"
    assert bridge.seen[0][2]["Authorization"] == "Bearer t0ken-for-tests"


def test_status_of_a_run_at_a_gate_says_since_when_and_the_work_left_after_it(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    since = "2026-01-01T17:15:00.000Z"
    report = _report(status="awaiting_approval")
    report["estimate"] = {"remaining_s": 4.0, "low_s": 3.0, "high_s": 6.0, "finish_at": None,
                          "waiting_since": since}
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, report)
    assert main(["status", "r1"]) == 0
    local = time.strftime("%H:%M:%S", time.localtime(epoch(since) or 0))
    assert capsys.readouterr().out.splitlines()[1] == (
        f"waiting since {local}; then about 4.0s left (3.0s–6.0s)")


def test_status_of_a_report_it_cannot_read_says_so_without_a_traceback(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, _report(status="exploded"))
    assert main(["status", "r1"]) == 1
    assert "the bridge answered a report this planrun cannot read" in capsys.readouterr().err


def test_status_shows_why_a_step_waits_and_what_a_finished_step_used(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    report = _report()
    report["steps"]["greet"]["resources"] = {"peak_memory_bytes": 44_040_192, "cpu_s": 0.31,
                                             "written_bytes": 12_288}
    report["steps"]["later"] = {"status": "pending", "tool": "shell.run", "attempts": 0,
                                "note": "waiting for a shell.run slot, 3 ahead"}
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, report)
    assert main(["status", "r1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split("0.25s", 1)[1].strip() == "42 MiB peak · 0.3 s CPU · 12 KiB written"
    assert lines[5].split("pending", 1)[1].strip() == "waiting for a shell.run slot, 3 ahead"


def test_a_submission_the_bridge_is_too_busy_for_says_when_to_try_again(
        bridge: FakeBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "hello.yaml"
    plan.write_text(PLAN)
    detail = "the queue is full: 3 run(s) wait to start (the limit is 3); try again in 15 s"
    bridge.answers[("POST", "/v1/runs")] = Canned(503, {"detail": detail, "reason": "queue_full",
                                                        "retry_after_s": 15})
    assert main(["submit", str(plan)]) == 1
    assert capsys.readouterr().err.strip() == f"planrun: the bridge answered 503: {detail}"


def test_status_of_an_ended_run_says_how_much_earlier_it_finished(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, _report(status="completed"))
    assert main(["status", "r1"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "finished 2.0s earlier than first estimated"


def test_status_json_prints_the_report_with_infinities_as_null(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(200, {"run_id": "r1", "x": [1.5]})
    assert main(["status", "r1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"run_id": "r1", "x": [1.5]}
    assert client.estimate_text(None, ended=False) == ""
    assert client.estimate_text(Estimate(remaining_s=0, low_s=0, high_s=0), ended=True) == ""


def test_status_of_an_unknown_run_shows_the_bridges_reason_and_exits_1(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/nope")] = Canned(404, {"detail": "no run nope"})
    assert main(["status", "nope"]) == 1
    assert capsys.readouterr().err.strip() == "planrun: the bridge answered 404: no run nope"


def test_a_bridge_error_that_is_not_json_is_shown_as_its_text(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(502, "upstream down", raw=True)
    assert main(["status", "r1"]) == 1
    assert capsys.readouterr().err.strip() == "planrun: the bridge answered 502: upstream down"


def test_a_refused_submission_lists_each_problem_the_bridge_found(
        bridge: FakeBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "hello.yaml"
    plan.write_text(PLAN)
    bridge.answers[("POST", "/v1/runs")] = Canned(422, {
        "detail": "plan refused", "errors": [{"text": "greet: core.echo not allowed"},
                                             {"message": "too many steps"}]})
    assert main(["submit", str(plan)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["planrun: the bridge answered 422: plan refused",
                                "greet: core.echo not allowed", "too many steps"]
    assert bridge.seen[0][3] == {"plan": PLAN, "inputs": {}}


def test_submit_prints_the_run_id_and_where_to_watch_it(
        bridge: FakeBridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "hello.yaml"
    plan.write_text(PLAN)
    bridge.answers[("POST", "/v1/runs")] = Canned(201, {"run_id": "r9", "view_url": "/v/r9"})
    assert main(["submit", str(plan)]) == 0
    out, err = capsys.readouterr()
    assert out == "r9\n"
    assert err.strip() == f"watch it: planrun watch r9  or  {bridge.url}/v/r9"


def test_pause_and_approve_print_the_bridges_answer(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("POST", "/v1/runs/r1/pause")] = Canned(202, {"status": "pausing"})
    bridge.answers[("POST", "/v1/runs/r1/steps/ship/reject")] = Canned(202,
                                                                       {"status": "running"})
    assert main(["pause", "r1"]) == 0
    assert main(["approve", "r1", "ship", "--reject", "--comment", "not today"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run r1: pausing", "run r1: step ship rejected; running"]
    assert bridge.seen[1][3] == {"comment": "not today"}


def test_a_control_the_bridge_refuses_exits_1_with_its_reason(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("POST", "/v1/runs/r1/resume")] = Canned(409, {"detail": "not paused"})
    assert main(["resume", "r1"]) == 1
    assert "the bridge answered 409: not paused" in capsys.readouterr().err


def test_a_wrong_explicit_token_says_planrun_token_is_wrong(
        bridge: FakeBridge, capsys: pytest.CaptureFixture[str]) -> None:
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(401, {"detail": "bad token"})
    assert main(["status", "r1"]) == 1
    err = capsys.readouterr().err
    assert "refused the token (PLANRUN_TOKEN is not its token)" in err
    assert "set PLANRUN_TOKEN to the token `planrun up` printed" in err


def test_a_wrong_token_file_names_the_file(
        bridge: FakeBridge, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PLANRUN_TOKEN")
    bridge.answers[("GET", "/v1/runs/r1")] = Canned(401, {"detail": "bad token"})
    assert main(["status", "r1"]) == 1
    assert f"refused the token ({bridge_token.path()} does not hold its token)" in \
        capsys.readouterr().err


def test_no_bridge_at_the_url_says_to_start_one_and_exits_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("PLANRUN_BRIDGE_URL", url)
    assert main(["watch", "r1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"planrun: no planrun stack answers at {url} (")
    assert "start one with `planrun up`, or set PLANRUN_BRIDGE_URL" in err


# -- watch: the WebSocket --------------------------------------------------------------

def _message(seq: int, kind: str, **fields: Any) -> str:
    return json.dumps({"seq": seq, "type": kind, "ts": f"2026-01-01T00:00:{seq:02d}Z",
                       **fields})


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[RunStatus, str | None, StepStatus | None]] = []

    def changed(self, run: RunRecord, step: StepRecord | None) -> None:
        self.seen.append((run.status, step.id if step else None,
                          step.status if step else None))


async def _watch_with(handler: Any, run_id: str = "r1", **kwargs: Any) -> tuple[
        RunRecord, Recorder]:
    recorder = Recorder()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PLANRUN_BRIDGE_URL", f"http://127.0.0.1:{port}")
            record = await client.watch(run_id, recorder, plan="hello", **kwargs)
    return record, recorder


def test_watch_follows_a_run_across_a_dropped_socket_without_missing_or_repeating() -> None:
    paths: list[str] = []
    plan = [{"id": "a", "tool": "shell.run"}, {"id": "b", "tool": "shell.run",
                                                "needs": ["a"], "critical": False}]

    async def handler(ws: ServerConnection) -> None:
        paths.append(ws.request.path if ws.request else "")
        if len(paths) == 1:
            await ws.send(_message(1, "run.started", summary="hello", plan=plan))
            await ws.send(_message(2, "step.running", step_id="a", status="running",
                                   attempt=1))
            await ws.send(_message(3, "progress", estimate={"remaining_s": 1.0, "low_s": 0.5,
                                                              "high_s": 2.0}))
            return  # the socket drops mid-run
        await ws.send(_message(2, "step.running", step_id="a", status="running", attempt=1))
        await ws.send(json.dumps({"type": "heartbeat"}))
        await ws.send(_message(4, "step.completed", step_id="a", status="completed",
                               attempt=1, duration_s=0.5))
        await ws.send(_message(5, "step.failed", step_id="b", status="failed", attempt=1,
                               error={"category": "logic", "message": "exit 1"}))
        await ws.send(_message(6, "run.completed_with_errors", summary="b failed"))
        await ws.wait_closed()

    remote: list[client.RemoteRun] = []
    record, recorder = asyncio.run(_watch_with(handler, on_start=remote.append))
    assert paths == ["/v1/runs/r1/ws?after=0", "/v1/runs/r1/ws?after=3"]
    assert recorder.seen == [
        (RunStatus.RUNNING, None, None), (RunStatus.RUNNING, "a", StepStatus.RUNNING),
        (RunStatus.RUNNING, "a", StepStatus.COMPLETED), (RunStatus.RUNNING, "b", StepStatus.FAILED),
        (RunStatus.COMPLETED_WITH_ERRORS, None, None)]
    assert record.status == RunStatus.COMPLETED_WITH_ERRORS and record.reason == "b failed"
    assert record.steps["a"].duration_s == 0.5
    assert record.steps["b"].error is not None and record.steps["b"].error.message == "exit 1"
    assert remote[0].estimate == Estimate(remaining_s=1.0, low_s=0.5, high_s=2.0)
    assert remote[0].ended


def test_a_remote_run_keeps_a_waiting_steps_note_and_a_finished_steps_resources() -> None:
    remote = client.RemoteRun("r1")
    remote.apply_frame(_message(1, "run.started", plan=[{"id": "a", "tool": "shell.run"}]))
    remote.apply_frame(_message(2, "step.waiting", step_id="a", status="pending",
                                note="waiting for a shell.run slot, 3 ahead"))
    assert remote.record.steps["a"].note == "waiting for a shell.run slot, 3 ahead"
    remote.apply_frame(_message(3, "step.running", step_id="a", status="running", attempt=1))
    assert remote.record.steps["a"].note is None
    used = {"peak_memory_bytes": 1024, "cpu_s": 0.5, "written_bytes": 10}
    remote.apply_frame(_message(4, "step.completed", step_id="a", status="completed",
                                attempt=1, duration_s=1.0, resources=used))
    resources = remote.record.steps["a"].resources
    assert resources is not None and resources.model_dump() == used


def test_a_remote_run_ignores_a_frame_it_cannot_read() -> None:
    remote = client.RemoteRun("r1")
    assert remote.apply_frame(_message(1, "run.started", plan=[])) is None
    assert remote.apply_frame(_message(2, "tool.exploded", step_id="a")) is None
    assert remote.apply_frame("not json") is None
    assert remote.last_seq == 1 and remote.record.status == RunStatus.RUNNING


def test_watch_stops_at_once_when_the_bridge_refuses_the_token() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(1008, "bad token")

    with pytest.raises(PlanrunError, match="refused the token"):
        asyncio.run(_watch_with(handler))


def test_watch_stops_at_once_when_the_bridge_refuses_the_origin() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(1008, "origin not allowed")

    with pytest.raises(PlanrunError,
                       match="the bridge refused to stream run r1: origin not allowed"):
        asyncio.run(_watch_with(handler))


def test_watch_of_a_run_the_bridge_will_not_stream_names_the_status() -> None:
    def refuse(ws: ServerConnection, request: Request) -> Response:
        return Response(403, "Forbidden", Headers([("Content-Length", "0")]), b"")

    async def never_called(ws: ServerConnection) -> None:
        raise AssertionError("the handshake was refused")

    async def run() -> None:
        recorder = Recorder()
        async with serve(never_called, "127.0.0.1", 0, process_request=refuse) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("PLANRUN_BRIDGE_URL", f"http://127.0.0.1:{port}")
                await client.watch("r1", recorder)

    with pytest.raises(PlanrunError, match="the bridge refused to stream run r1: 403"):
        asyncio.run(run())


def test_watch_gives_up_when_the_bridge_stays_away(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("PLANRUN_BRIDGE_URL", url)
    with pytest.raises(PlanrunError, match=f"lost the bridge at {url} for 0s"):
        asyncio.run(client.watch("r1", Recorder(), give_up_s=0.0))


def test_watch_prints_each_change_then_the_outcome_and_exits_as_run_would(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from websockets.sync.server import ServerConnection as SyncConnection
    from websockets.sync.server import serve as serve_sync

    report = json.dumps({"run_id": "r1", "plan": "hello", "status": "running"}).encode()

    def status_over_http(ws: SyncConnection, request: Request) -> Response | None:
        if request.path == "/v1/runs/r1":
            return Response(200, "OK", Headers([("Content-Type", "application/json"),
                                                ("Content-Length", str(len(report)))]),
                            report)
        return None  # the WebSocket

    def stream(ws: SyncConnection) -> None:
        ws.send(_message(1, "run.started", summary="hello",
                         plan=[{"id": "a", "tool": "shell.run"}]))
        ws.send(_message(2, "step.failed", step_id="a", status="failed", attempt=1,
                         error={"category": "logic", "message": "exit 1", "hint": "h"}))
        ws.send(_message(3, "run.failed", summary="a failed"))

    with serve_sync(stream, "127.0.0.1", 0, process_request=status_over_http) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.socket.getsockname()[1]
        monkeypatch.setenv("PLANRUN_BRIDGE_URL", f"http://127.0.0.1:{port}")
        code = main(["watch", "r1"])
        server.shutdown()
    out, err = capsys.readouterr()
    assert code == 1 and out == "run r1 failed\n"
    assert [line.split("] ", 1)[1] for line in err.splitlines()] == [
        "run hello running (0/1)", "a failed attempt 1: logic: exit 1 — h",
        "run hello failed (1/1): a failed"]


def test_watch_shows_why_a_step_waits_until_it_starts_and_ignores_breaker_lines() -> None:
    from planrun.console import _note

    remote = client.RemoteRun("r1")
    plan = [{"id": "build", "tool": "shell.run"}]
    remote.apply_frame(_message(1, "run.started", plan=plan, summary="p"))
    waited = remote.apply_frame(_message(2, "step.waiting", step_id="build", status="pending",
                                         note="waiting for a shell.run slot, 3 ahead"))
    assert waited is not None and _note(waited) == "waiting for a shell.run slot, 3 ahead"
    assert remote.apply_frame(_message(3, "tool.circuit_opened", status="open",
                                       tool="search.web", note="failing")) is None
    running = remote.apply_frame(_message(4, "step.running", step_id="build",
                                          status="running", attempt=1))
    assert running is not None and running.note is None and _note(running) == ""
