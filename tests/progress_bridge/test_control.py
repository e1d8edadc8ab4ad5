"""``POST /v1/runs`` and ``GET /v1/runs/{id}`` on a real bridge under uvicorn. Starting the
run is a recording stand-in here; tests/test_stack.py submits to the real runner."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from .conftest import BridgeFactory, ServedBridge

PLAN = """version: 1
name: greet
inputs:
  who: {type: string, default: world}
  times: {type: integer}
steps:
  - id: hello
    tool: core.echo
    with: {value: "hello {{ inputs.who }}"}
"""
BROKEN = """version: 1
name: broken
steps:
  - id: a
    tool: no.such
  - id: b
    tool: core.echo
    needs: [missing]
    with: {value: 1}
  - id: b
    tool: core.sleep
    with: {seconds: soon}
"""


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []

    async def __call__(self, plan: dict[str, Any], inputs: dict[str, Any]) -> str:
        self.calls.append((plan, inputs))
        return f"run-{len(self.calls)}"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def submitting(bridge_factory: BridgeFactory, recorder: Recorder) -> ServedBridge:
    return bridge_factory(submit=recorder)


def test_a_valid_plan_is_submitted_with_typed_inputs_and_defaults(
        submitting: ServedBridge, recorder: Recorder) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs", json={"plan": PLAN, "inputs": {"times": 2}},
                        headers=submitting.auth)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body == {"run_id": "run-1", "status_url": "/v1/runs/run-1",
                    "events_url": "/v1/runs/run-1/events", "view_url": "/v1/runs/run-1/view"}
    plan, inputs = recorder.calls[0]
    assert plan["name"] == "greet" and plan["steps"][0]["with"]["value"] == "hello {{ inputs.who }}"
    assert inputs == {"who": "world", "times": 2}

    # Known at once, pending until its engine starts it; its page in the Prefect UI too.
    report = httpx.get(f"{submitting.http}/v1/runs/run-1", headers=submitting.auth).json()
    assert (report["run_id"], report["plan"], report["status"]) == ("run-1", "greet", "pending")
    assert report["last_seq"] == 0
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    assert report["prefect_url"] == f"{ui}/runs/flow-run/run-1"


def test_a_plan_given_as_an_object_is_validated_the_same_way(
        submitting: ServedBridge, recorder: Recorder) -> None:
    plan = {"version": 1, "name": "obj", "steps": [
        {"id": "a", "tool": "core.sleep", "with": {"seconds": "soon"}}]}
    refused = httpx.post(f"{submitting.http}/v1/runs", json={"plan": plan}, headers=submitting.auth)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["path"] == "steps[0].with.seconds"
    plan["steps"][0]["with"]["seconds"] = 0.01
    assert httpx.post(f"{submitting.http}/v1/runs", json={"plan": plan},
                      headers=submitting.auth).status_code == 201
    assert recorder.calls[0][0] == plan


def test_an_invalid_plan_gets_422_with_every_error_and_starts_nothing(
        submitting: ServedBridge, recorder: Recorder) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs", json={"plan": BROKEN},
                        headers=submitting.auth)
    assert answer.status_code == 422
    body = answer.json()
    assert body["detail"] == "the plan is not valid"
    paths = {e["path"] for e in body["errors"]}
    assert {"steps[0].tool", "steps[1].needs[0]", "steps[2].id", "steps[2].with.seconds"} <= paths
    assert all(e["line"] > 0 and e["message"] for e in body["errors"])
    assert "no.such" in " ".join(e["message"] for e in body["errors"])
    assert recorder.calls == []


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "input 'times' is required"),
    ({"times": "two"}, "input 'times'"),
    ({"times": 1, "extra": 1}, "unknown input extra"),
])
def test_bad_inputs_get_422_naming_the_input(submitting: ServedBridge, recorder: Recorder,
                                             inputs: dict[str, Any], message: str) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs", json={"plan": PLAN, "inputs": inputs},
                        headers=submitting.auth)
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["path"] == "inputs"
    assert message in answer.json()["errors"][0]["message"]
    assert recorder.calls == []


@pytest.mark.parametrize("body", [b"not json", b'{"inputs": {}}', b'{"plan": 3}', b"[]",
                                  b'{"plan": "x", "inputs": []}'])
def test_a_body_that_is_not_a_submission_gets_422_with_the_expected_shape(
        submitting: ServedBridge, body: bytes) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs", content=body,
                        headers={"content-type": "application/json", **submitting.auth})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("the request body is not a submission")


def test_yaml_that_is_not_a_plan_gets_422(submitting: ServedBridge) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs", json={"plan": "a: [unclosed"},
                        headers=submitting.auth)
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["line"] >= 1


def test_a_huge_plan_gets_413_without_being_read(submitting: ServedBridge) -> None:
    answer = httpx.post(f"{submitting.http}/v1/runs",
                        json={"plan": "#" * (6 * 1024 * 1024)}, headers=submitting.auth)
    assert answer.status_code == 413


def test_a_bridge_without_a_runner_says_it_cannot_start_runs(bridge: ServedBridge) -> None:
    answer = httpx.post(f"{bridge.http}/v1/runs", json={"plan": PLAN, "inputs": {"times": 1}},
                        headers=bridge.auth)
    assert answer.status_code == 503
    assert "planrun up" in answer.json()["detail"]


def test_the_run_routes_need_the_token(bridge_factory: BridgeFactory,
                                       recorder: Recorder) -> None:
    bridge = bridge_factory(token="s3cret", submit=recorder)
    body = {"plan": PLAN, "inputs": {"times": 1}}
    assert httpx.post(f"{bridge.http}/v1/runs", json=body).status_code == 401
    assert httpx.get(f"{bridge.http}/v1/runs/x").status_code == 401
    assert recorder.calls == []
    auth = {"Authorization": "Bearer s3cret"}
    created = httpx.post(f"{bridge.http}/v1/runs", json=body, headers=auth)
    assert created.status_code == 201
    run_id = created.json()["run_id"]
    assert httpx.get(f"{bridge.http}/v1/runs/{run_id}", headers=auth).status_code == 200
    assert recorder.calls and len(recorder.calls) == 1


def test_the_openapi_document_describes_the_run_routes(bridge: ServedBridge) -> None:
    spec = httpx.get(f"{bridge.http}/openapi.json", headers=bridge.auth).json()
    assert {"/v1/runs", "/v1/runs/{run_id}"} <= set(spec["paths"])
    assert "422" in spec["paths"]["/v1/runs"]["post"]["responses"]
