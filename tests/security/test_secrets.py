"""Secrets are never stored or shown (issue 8, item 5; docs/secrets.md).

A plan's secret input and ``{{ secrets.NAME }}`` hold canary values. The plan echoes them
(``core.echo``), prints them (``shell.run``), sends them in HTTP headers to a local server
that reflects them in its answer, and puts them in a failing step's error. The plan runs
with ``planrun run`` and through a real stack (bridge, runner, Prefect server); the
canaries are then searched for in the Prefect API, the files planrun and Prefect keep, the
reports, the stream and the terminal output: never found, while the server did receive
them (the tools got the real values).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.helpers import cli, wait_for
from tests.security.canary import everywhere
from tests.stack import Stack, messages

PLAN = """\
version: 1
name: canary
inputs:
  token: {type: string, secret: true}
  url: {type: string}
steps:
  - id: echo
    tool: core.echo
    with: {value: "input {{ inputs.token }} named {{ secrets.canary_named }}"}
  - id: printed
    tool: shell.run
    critical: false
    with: {argv: [printf, "%s|%s", "{{ inputs.token }}", "{{ secrets.canary_named }}"]}
  - id: header
    tool: http.request
    critical: false
    with:
      url: "{{ inputs.url }}"
      headers: {X-Token: "{{ inputs.token }}", X-Named: "{{ secrets.canary_named }}"}
  - id: fails
    tool: core.fail
    critical: false
    with: {category: logic, message: "boom {{ inputs.token }} {{ secrets.canary_named }}"}
"""


class Reflector(BaseHTTPRequestHandler):
    """Answers with the request's headers as JSON, and keeps them."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        body = json.dumps(dict(self.headers)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def reflector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Reflector)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def canaries() -> tuple[str, str]:
    return f"canary-input-{uuid.uuid4().hex[:16]}", f"canary-named-{uuid.uuid4().hex[:16]}"


def url_of(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/reflect"


def wait_until_logged(run_id: str) -> None:
    """Until the flow run's final log line reached the API (logs are sent in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def finished() -> bool:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
        return any("Finished in state" in log.message for log in logs)

    wait_for(lambda: asyncio.run(finished()), 60, "the run's last log line")


def assert_used_and_hidden(report: dict[str, Any], seen: list[dict[str, str]],
                           secret: str, named: str) -> None:
    """The tools got the real values; the report shows only ***."""
    assert any(h.get("X-Token") == secret and h.get("X-Named") == named for h in seen)
    steps = report["steps"]
    assert steps["echo"]["output"] == {"value": "input *** named ***"}
    assert steps["fails"]["error"]["message"] == "boom *** ***"
    assert "***" in json.dumps(steps["header"]["output"])


def test_a_secret_run_with_planrun_run_is_found_nowhere(
        tmp_path: Path, reflector: ThreadingHTTPServer) -> None:
    secret, named = canaries()
    plan = tmp_path / "canary.yaml"
    plan.write_text(PLAN)
    env = {"PLANRUN_SECRET_CANARY_NAMED": named, "PLANRUN_WORKSPACE": str(tmp_path / "ws")}
    args = ("run", str(plan), "--input", f"token={secret}", "--input", f"url={url_of(reflector)}")
    as_json = cli(*args, "--json", env=env)
    shown = cli(*args, env=env)  # the terminal display
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 3, as_json.stderr  # completed with errors: the failing step
    assert_used_and_hidden(report, reflector.seen, secret, named)  # type: ignore[attr-defined]
    wait_until_logged(report["run_id"])
    found = everywhere(url_of(reflector))  # not a secret: the search finds where it is kept
    assert any(hit.startswith("flow run") for hit in found), found
    assert any(hit.startswith("event") for hit in found), found
    assert everywhere(secret, named, texts={
        "--json stdout": as_json.stdout, "--json stderr": as_json.stderr,
        "terminal stdout": shown.stdout, "terminal stderr": shown.stderr},
        directories=[tmp_path]) == []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("secrets")
    policy = home / "policy.yaml"
    policy.write_text("submitted: {allow_private: true}\n")  # the reflector is on loopback
    named = f"canary-named-{uuid.uuid4().hex[:16]}"
    running = Stack(home, env={"PLANRUN_POLICY": str(policy),
                               "PLANRUN_SECRET_CANARY_NAMED": named})
    running.named = named  # type: ignore[attr-defined]
    yield running
    if running.process.poll() is None:
        running.stop()


def test_a_secret_run_submitted_to_the_stack_is_found_nowhere(
        stack: Stack, tmp_path: Path, reflector: ThreadingHTTPServer) -> None:
    secret, named = canaries()[0], stack.named  # type: ignore[attr-defined]
    plan = tmp_path / "canary.yaml"
    plan.write_text(PLAN)
    submitted = stack.cli("submit", str(plan), "--input", f"token={secret}",
                          "--input", f"url={url_of(reflector)}")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.split()[0]
    stream = messages(stack, run_id, timeout=120)
    status = stack.cli("status", run_id, "--json")
    report = json.loads(status.stdout)
    assert report["status"] == "completed_with_errors", report
    assert_used_and_hidden(report, reflector.seen, secret, named)  # type: ignore[attr-defined]
    wait_until_logged(run_id)
    assert everywhere(secret, named, texts={
        "submit output": submitted.stdout + submitted.stderr,
        "status --json": status.stdout, "stream": json.dumps(stream),
        "planrun up output": stack.output()}, directories=[tmp_path]) == []
