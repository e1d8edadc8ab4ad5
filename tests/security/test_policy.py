"""Attacks of a submitted plan on the network, through a real stack (``planrun up``: the
Prefect server, the runner, the bridge) under an operator's policy file: each one refused,
naming the rule, and the target never reached."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from planrun.policy import POLICY_ENV
from tests.helpers import cli, wait_for
from tests.security.local_server import LocalServer, local_server
from tests.stack import Stack

ENDED = {"completed", "completed_with_errors", "failed", "cancelled"}
DEFAULTS = "submitted: {}\n"


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(DEFAULTS)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, policy_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("stack"), env={POLICY_ENV: str(policy_path)})
    yield running
    if running.process.poll() is None:
        running.stop()


@pytest.fixture
def policy(policy_path: Path) -> Iterator[Path]:
    """The stack's policy file, for a test to write; the defaults again afterwards."""
    yield policy_path
    policy_path.write_text(DEFAULTS)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as running:
        yield running


def submit(stack: Stack, plan: dict[str, Any], inputs: dict[str, Any] | None = None
           ) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/runs", json={"plan": plan, "inputs": inputs or {}},
                      headers=stack.auth, timeout=30)


def fetch_plan(*urls: str) -> dict[str, Any]:
    return {"version": 1, "name": "exfiltrate", "steps": [
        {"id": f"s{i}", "tool": "http.request", "with": {"url": url}, "critical": False}
        for i, url in enumerate(urls)]}


def finished(stack: Stack, run_id: str) -> dict[str, Any]:
    def report() -> dict[str, Any] | None:
        body = stack.report(run_id)
        return body if body["status"] in ENDED else None
    return wait_for(report, 120, f"run {run_id} to end")  # type: ignore[no-any-return]


def test_literal_network_attacks_are_refused_with_422_naming_each_rule(
        stack: Stack, server: LocalServer) -> None:
    api = os.environ["PREFECT_API_URL"]
    answer = submit(stack, fetch_plan(
        f"{api}/flow_runs/filter", server.url("/secret"),
        "http://169.254.169.254/latest/meta-data/iam", f"http://localhost:{server.port}/",
        f"{stack.url}/v1/runs"))
    assert answer.status_code == 422, answer.text
    errors = {e["path"]: e["message"] for e in answer.json()["errors"]}
    assert errors == {
        "steps[0].with.url": f"http.request is blocked by policy: "
                             f"{api.split('/')[2]} is the Prefect API: a submitted plan may "
                             "never reach it (docs/policy.md)",
        "steps[1].with.url": "http.request is blocked by policy: 127.0.0.1 is a loopback "
                             "address: the 'submitted' policy denies loopback addresses "
                             "(docs/policy.md)",
        "steps[2].with.url": "http.request is blocked by policy: 169.254.169.254 is a "
                             "link-local (cloud metadata) address: the 'submitted' policy "
                             "denies link-local (cloud metadata) addresses (docs/policy.md)",
        "steps[3].with.url": "http.request is blocked by policy: localhost (127.0.0.1) "
                             "is a loopback address: the 'submitted' policy denies loopback "
                             "addresses (docs/policy.md)",
        "steps[4].with.url": f"http.request is blocked by policy: 127.0.0.1:{stack.port} is "
                             "the planrun bridge: a submitted plan may never reach it "
                             "(docs/policy.md)",
    }
    assert server.hits == []


def test_templated_attacks_are_refused_where_the_step_runs(stack: Stack,
                                                           server: LocalServer) -> None:
    api = os.environ["PREFECT_API_URL"]
    plan = {"version": 1, "name": "templated", "inputs": {
        "api": {"type": "string"}, "local": {"type": "string"}, "metadata": {"type": "string"}},
        "steps": [{"id": name, "tool": "http.request", "critical": False,
                   "with": {"url": f"{{{{ inputs.{name} }}}}"}}
                  for name in ("api", "local", "metadata")]}
    answer = submit(stack, plan, {"api": f"{api}/health", "local": server.url("/secret"),
                                  "metadata": "http://169.254.169.254/latest/meta-data/"})
    assert answer.status_code == 201, answer.text
    report = finished(stack, answer.json()["run_id"])
    errors = {sid: step["error"] for sid, step in report["steps"].items()}
    assert {e["category"] for e in errors.values()} == {"configuration"}
    assert all(step["attempts"] == 1 for step in report["steps"].values())
    assert errors["api"]["message"].endswith("is the Prefect API: a submitted plan may never "
                                             "reach it")
    assert errors["local"]["message"] == ("blocked by policy: 127.0.0.1 is a loopback "
                                          "address: the 'submitted' policy denies loopback "
                                          "addresses")
    assert "169.254.169.254 is a link-local (cloud metadata) address" in \
        errors["metadata"]["message"]
    assert server.hits == []


def test_a_granted_host_that_redirects_to_another_loopback_port_is_refused_at_the_redirect(
        stack: Stack, server: LocalServer, policy: Path) -> None:
    policy.write_text(textwrap.dedent(f"""\
        submitted:
          allow_private: true
          hosts: ["127.0.0.1:{server.port}"]
        """))
    with local_server() as inside:
        answer = submit(stack, fetch_plan(server.url(f"/redirect?to={inside.url('/admin')}")))
        assert answer.status_code == 201, answer.text
        report = finished(stack, answer.json()["run_id"])
        assert report["steps"]["s0"]["error"]["message"] == (
            f"blocked by policy: 127.0.0.1:{inside.port} is not in the 'submitted' policy's "
            f"hosts (127.0.0.1:{server.port})")
        assert server.hits == [f"/redirect?to={inside.url('/admin')}"]
        assert inside.hits == []


def test_a_malformed_policy_refuses_every_submission(stack: Stack, policy: Path,
                                                     tmp_path: Path) -> None:
    policy.write_text("submitted:\n  tools: core.*\n")
    answer = submit(stack, {"version": 1, "name": "harmless", "steps": [
        {"id": "a", "tool": "core.echo", "with": {"value": 1}}]})
    assert answer.status_code == 503, answer.text
    assert f"{policy}:2:10: submitted.tools: Input should be a valid list" in \
        answer.json()["detail"]
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nname: harmless\nsteps:\n"
                    "  - {id: a, tool: core.echo, with: {value: 1}}\n")
    proc = cli("submit", str(plan), env={"PLANRUN_BRIDGE_URL": stack.url, POLICY_ENV: str(policy),
                                         "PLANRUN_HOME": stack.env["PLANRUN_HOME"]})
    assert proc.returncode == 2, proc.stderr
    assert "submitted.tools: Input should be a valid list" in proc.stderr
    assert "Traceback" not in proc.stderr
