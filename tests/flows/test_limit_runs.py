"""Limits through real ``planrun run`` processes against the test session's Prefect server,
with a real HTTP service on 127.0.0.1 that counts the requests in flight: 200 steps at a
limit of 4, one limit shared by two processes, a retry's delay giving its slot back, and
steps waiting (or skipped) under a load threshold the policy forces."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from planrun.flows.limit_store import FILE_NAME
from tests.helpers import PLANRUN, cli, cli_json, serving, wait_for


class Counting(ThreadingHTTPServer):
    """Answers each GET after ``delay_s``; ``/fail-once`` answers 503 the first time.
    Keeps every request's path and times, and the most in flight at once. While ``gate``
    is clear, a request waits for it; it opens by itself once ``open_at`` requests are in
    flight at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.seen: list[tuple[str, float, float]] = []
        self.failed: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.open_at = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _, _ in sorted(self.seen, key=lambda s: s[1])]


class _Handler(BaseHTTPRequestHandler):
    server: Counting

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server, start = self.server, time.monotonic()
        with server.lock:
            server.in_flight += 1
            server.most = max(server.most, server.in_flight)
            if server.open_at and server.in_flight >= server.open_at:
                server.gate.set()
        server.gate.wait(60)
        time.sleep(server.delay_s)
        path = urlsplit(self.path).path
        with server.lock:
            fail = path == "/fail-once" and path not in server.failed
            server.failed.add(path)
            server.in_flight -= 1
            server.seen.append((self.path, start, time.monotonic()))
        self.send_response(503 if fail else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


@pytest.fixture
def service() -> Iterator[Counting]:
    with serving(Counting()) as server:
        yield server
        server.gate.set()
    server.server_close()


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def policy(tmp_path: Path, limits: str) -> dict[str, str]:
    """A policy with this ``limits:`` section; http.request's breaker off (the service's
    deliberate 503 must not count against it)."""
    return {"PLANRUN_POLICY": write(tmp_path / "policy.yaml", f"""
        breakers: {{http.request: {{enabled: false}}}}
        limits: {limits}
        """)}


def gets(tmp_path: Path, name: str, urls: list[str], extra: str = "") -> str:
    body = "".join(f"""
      - {{id: s{i}, tool: http.request, with: {{url: "{url}"}}}}""" for i, url in enumerate(urls))
    return write(tmp_path / f"{name}.yaml", f"""
        version: 1
        name: {name}
        limits: {{max_parallel: 16}}
        steps:{textwrap.indent(body, "        ")}{extra}
        """)


def waiting_events(since: float) -> list[dict[str, Any]]:
    """The ``planrun.step.waiting`` events the Prefect server has, since ``since``."""
    answer = httpx.post(f"{os.environ['PREFECT_API_URL']}/events/filter", timeout=10, json={
        "filter": {"event": {"name": ["planrun.step.waiting"]},
                   "occurred": {"since": _iso(since)}, "order": "ASC"}, "limit": 50})
    return [e["payload"] for e in answer.json()["events"]]


def _iso(at: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).isoformat()


def test_two_hundred_steps_at_a_limit_of_four_never_have_more_than_four_in_flight(
        tmp_path: Path, service: Counting) -> None:
    service.delay_s = 0.02
    service.gate.clear()  # the first requests wait until four are in flight: the limit is
    service.open_at = 4   # reached however slowly a loaded machine starts the steps
    started = time.time()
    env = policy(tmp_path, "{tools: {http.request: {concurrency: 4}}}")
    plan = gets(tmp_path, "many", [service.url(f"/n/{i}") for i in range(200)])
    proc = cli("run", plan, env=env, timeout=600)  # the console's lines, on stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed" in proc.stdout
    assert len(service.seen) == 200
    assert service.most == 4
    # each waiting step's note is shown once, however often its place in line changed
    notes = [line for line in proc.stderr.splitlines() if "waiting for a http.request slot" in line]
    steps = [line.partition("] ")[2].split()[0] for line in notes]
    assert notes and len(steps) == len(set(steps))
    assert all(" pending attempt 1: " in line for line in notes)
    found = wait_for(lambda: waiting_events(started), 30, "the waiting events on the server")
    assert found[0]["why"] == "slot"
    assert found[0]["note"].startswith("waiting for a http.request slot (limit 4), ")


def test_two_processes_share_a_limit_of_one(tmp_path: Path, service: Counting) -> None:
    env = {**os.environ, **policy(tmp_path, "{tools: {http.request: {concurrency: 1}}}"),
           "PLANRUN_RUN_HOST": "0"}  # each run in the process whose pid the store holds
    started = time.time()
    service.gate.clear()  # the first request to arrive waits until the other process waits
    runs = [subprocess.Popen(
        [*PLANRUN, "run", gets(tmp_path, name, [service.url(f"/{name}/{i}") for i in range(3)]),
         "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("first", "second")]
    try:
        store = Path(os.environ["PLANRUN_HOME"]) / FILE_NAME
        pids = {run.pid for run in runs}
        wait_for(lambda: service.in_flight == 1 and _waiting_pids(store) >= pids, 120,
                 "one process to hold the slot and both to have steps waiting for it")
        assert service.in_flight == 1
        note = "waiting for a http.request slot (limit 1), "
        wait_for(lambda: any(e["note"].startswith(note) for e in waiting_events(started)), 30,
                 "a waiting step's event on the server")
        service.gate.set()
        outcomes = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.kill() if run.poll() is None else None
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outcomes]
    assert len(service.seen) == 6 and service.most == 1
    spans = sorted((start, end) for _, start, end in service.seen)
    assert all(end <= later for (_, end), (later, _) in zip(spans, spans[1:], strict=False))


def _waiting_pids(store: Path) -> set[int]:
    """The processes with a turn waiting in the limits' store."""
    if not store.exists():
        return set()
    with sqlite3.connect(store, timeout=10) as db:
        return {pid for pid, in db.execute("SELECT pid FROM turns WHERE granted = 0")}


def test_a_retry_delay_gives_its_slot_back(tmp_path: Path, service: Counting) -> None:
    env = policy(tmp_path, "{tools: {http.request: {concurrency: 1}}}")
    plan = write(tmp_path / "retry.yaml", f"""
        version: 1
        name: retry
        steps:
          - id: flaky
            tool: http.request
            with: {{url: "{service.url('/fail-once')}"}}
            retry: {{max_attempts: 2, backoff: fixed, initial_delay: 3s, jitter: 0}}
          - {{id: later, tool: core.sleep, with: {{seconds: 0.3}}}}
          - {{id: other, tool: http.request, needs: [later], with: {{url: "{service.url('/ok')}"}}}}
        """)
    code, report = cli_json("run", plan, env=env, timeout=300)
    assert code == 0, report
    assert report["steps"]["flaky"]["attempts"] == 2
    # while flaky waited for its second attempt, other took the only slot
    assert service.paths() == ["/fail-once", "/ok", "/fail-once"]


def test_under_a_forced_load_threshold_steps_wait_and_optional_steps_are_skipped(
        tmp_path: Path) -> None:
    env = policy(tmp_path, "{load: {memory_percent: 0}}")  # always "under pressure"
    started = time.time()
    plan = write(tmp_path / "loaded.yaml", """
        version: 1
        name: loaded
        steps:
          - {id: x, tool: core.sleep, with: {seconds: 0.5}}
          - {id: y, tool: core.sleep, with: {seconds: 0.5}}
          - {id: nice, tool: core.echo, with: {value: 1}, degrade: skip}
        """)
    proc = cli("run", plan, "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["status"] == "completed"
    nice = report["steps"]["nice"]
    assert nice["status"] == "skipped"
    assert nice["reason"].startswith("skipped under load: memory in use ")
    x, y = report["steps"]["x"], report["steps"]["y"]
    assert x["status"] == y["status"] == "completed"
    # One at a time: the second's call began once the first's 0.5-s call had returned
    # (its limit is given back then, a moment before the first is recorded as ended).
    first, second = sorted(datetime.fromisoformat(s["started_at"]) for s in (x, y))
    assert (second - first).total_seconds() >= 0.5
    found = wait_for(lambda: [e for e in waiting_events(started) if e["why"] == "load"], 30,
                     "the waiting event on the server")
    assert found[0]["step_id"] in ("x", "y")
    assert found[0]["note"].startswith("waiting for the machine's load to drop: memory in use")
