"""Circuit breakers and tool health through real ``planrun run`` processes against the test
session's Prefect server, with a real HTTP service on 127.0.0.1 that fails, then recovers."""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from planrun.flows.breakers import Breakers, State
from tests.helpers import cli, cli_json, wait_for

FAILURES = 3


class Flaky(ThreadingHTTPServer):
    """Answers 500 to its first ``fail`` requests, then 200 after ``delay_s``; ``hits``
    counts every request that reached it."""

    daemon_threads = True

    def __init__(self, fail: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail = fail
        self.delay_s = 0.0
        self.hits = 0
        self.lock = threading.Lock()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class _Handler(BaseHTTPRequestHandler):
    server: Flaky

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits += 1
            failing = self.server.hits <= self.server.fail
        if not failing:
            time.sleep(self.server.delay_s)  # a slow recovery: the trial call is in flight
        self.send_response(500 if failing else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    server = Flaky(fail=FAILURES)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def policy(tmp_path: Path, cooldown_s: float = 2) -> dict[str, str]:
    """A policy whose http.request breaker opens after FAILURES (local runs may reach
    loopback by default)."""
    path = write(tmp_path / "policy.yaml", f"""
        breakers:
          http.request: {{failures: {FAILURES}, window_s: 60, cooldown_s: {cooldown_s}}}
    """)
    return {"PLANRUN_POLICY": path}


def plan(tmp_path: Path, name: str, url: str, steps: int = 1, attempts: int = 1,
         fallbacks: tuple[int, ...] = ()) -> str:
    """A plan of ``steps`` parallel GETs of ``url``; steps ``fallbacks`` have a fallback."""
    spare = "\n        fallback: {tool: core.echo, with: {value: spare}}"
    body = "".join(f"""
      - id: s{i}
        tool: http.request
        critical: false
        with: {{url: "{url}"}}{spare if i in fallbacks else ""}""" for i in range(steps))
    return write(tmp_path / f"{name}.yaml", f"""
        version: 1
        name: {name}
        defaults:
          retry: {{max_attempts: {attempts}, backoff: fixed, initial_delay: 10ms}}
        limits: {{max_parallel: {steps}}}
        steps:{textwrap.indent(body, "        ")}
    """)


def breaker_of(url: str) -> Any:
    key = f"http.request@{httpx.URL(url).host}:{httpx.URL(url).port}"
    return asyncio.run(Breakers(ttl_s=0).view(key)), key


def circuit_events(key: str) -> list[str]:
    answer = httpx.post(f"{os.environ['PREFECT_API_URL']}/events/filter", timeout=10, json={
        "filter": {"event": {"prefix": ["planrun.tool.circuit_"]},
                   "any_resource": {"id": [f"planrun.tool.{key}"]}, "order": "ASC"},
        "limit": 50})
    return [e["event"] for e in answer.json()["events"]]


def test_a_breaker_opened_by_one_run_is_shown_by_tools_and_fails_fast_in_another_process(
        tmp_path: Path, flaky: Flaky) -> None:
    env = policy(tmp_path, cooldown_s=600)  # open for the whole test, however slow the machine
    code, report = cli_json("run", plan(tmp_path, "opens", flaky.url(), attempts=FAILURES),
                            env=env)
    assert code == 3 and report["steps"]["s0"]["attempts"] == FAILURES
    assert flaky.hits == FAILURES
    view, key = breaker_of(flaky.url())
    assert view.state == State.OPEN and view.failures == FAILURES

    proc = cli("tools", env=env)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("core.echo") and " ok " in line
               for line in proc.stdout.splitlines())
    assert f"breaker open: {key} is failing in every run ({FAILURES} in 60 s); " \
           "the next try is at" in proc.stdout

    # A new process reads the state from the server: no request reaches the service, and
    # a step with a fallback is completed by it.
    code, report = cli_json("run", plan(tmp_path, "refused", flaky.url(), 2, fallbacks=(1,)),
                            env=env)
    assert flaky.hits == FAILURES
    error = report["steps"]["s0"]["error"]
    assert error["category"] == "resource"
    assert f"{key} is failing in every run ({FAILURES} in 60 s); the next try is at" \
        in error["message"]
    assert report["steps"]["s1"]["fallback_used"]


def test_after_the_cool_down_exactly_one_trial_call_closes_the_breaker(
        tmp_path: Path, flaky: Flaky) -> None:
    env = policy(tmp_path, cooldown_s=1)
    code, _ = cli_json("run", plan(tmp_path, "opens", flaky.url(), attempts=FAILURES), env=env)
    view, key = breaker_of(flaky.url())
    assert code == 3 and view.state == State.OPEN

    # After the cool-down, three steps at once: exactly one trial call reaches the service.
    wait_for(lambda: time.time() >= (view.probe_at or 0), timeout=60, what="the cool-down")
    flaky.delay_s = 1.0
    code, report = cli_json("run", plan(tmp_path, "trial", flaky.url(), 3), env=env)
    assert flaky.hits == FAILURES + 1
    statuses = sorted(s["status"] for s in report["steps"].values())
    assert statuses == ["completed", "failed", "failed"]
    assert all("a trial call is under way" in s["error"]["message"]
               for s in report["steps"].values() if s["status"] == "failed")
    assert breaker_of(flaky.url())[0].state == State.CLOSED

    flaky.delay_s = 0.0
    code, report = cli_json("run", plan(tmp_path, "closed", flaky.url(), 2), env=env)
    assert code == 0 and flaky.hits == FAILURES + 3
    wait_for(lambda: circuit_events(key) == ["planrun.tool.circuit_opened",
                                             "planrun.tool.circuit_half_open",
                                             "planrun.tool.circuit_closed"],
             timeout=30, what="the breaker's three events on the server")


def test_a_run_using_an_unhealthy_tool_fails_its_steps_early_with_the_hint(
        tmp_path: Path, flaky: Flaky) -> None:
    env = {"PLANRUN_POLICY": write(tmp_path / "policy.yaml",
                                   "local: {hosts: []}\nsubmitted: {hosts: []}\n")}
    proc = cli("tools", env=env)
    assert ("http.request   UNHEALTHY send an HTTP request\n"
            "                   the policy allows no host (hosts: [])\n") in proc.stdout
    plan_file = write(tmp_path / "sick.yaml", """
        version: 1
        name: sick
        inputs:
          url: {type: string}
        steps:
          - id: plain
            tool: http.request
            critical: false
            with: {url: "{{ inputs.url }}"}
          - id: spared
            tool: http.request
            with: {url: "{{ inputs.url }}"}
            fallback: {tool: core.echo, with: {value: spare}}
    """)
    code, report = cli_json("run", plan_file, "--input", f"url={flaky.url()}", env=env)
    assert code == 3 and flaky.hits == 0
    error = report["steps"]["plain"]["error"]
    assert error["category"] == "configuration" and report["steps"]["plain"]["attempts"] == 1
    assert error["message"] == "http.request is unhealthy: the policy allows no host (hosts: [])"
    assert "failed its health check before the run started" in error["hint"]
    assert report["steps"]["spared"]["fallback_used"]


@pytest.mark.parametrize(("settings", "problem"), [
    ("{http.request: {failures: 0}}", 'breakers["http.request"].failures: Input should be '
                                      "greater than or equal to 1"),
    ("{http.request: {window: 5}}", 'breakers["http.request"].window: unknown key'),
    ("{'not a tool': {failures: 2}}", "is not a tool name like 'search.web'"),
])
def test_malformed_breaker_settings_are_a_policy_error(tmp_path: Path, settings: str,
                                                       problem: str) -> None:
    env = {"PLANRUN_POLICY": write(tmp_path / "policy.yaml", f"breakers: {settings}\n")}
    proc = cli("run", write(tmp_path / "p.yaml", """
        version: 1
        name: p
        steps: [{id: a, tool: core.echo, with: {value: 1}}]
    """), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not valid (docs/policy.md)" in proc.stderr and problem in proc.stderr
