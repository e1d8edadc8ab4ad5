"""Approval gates only a person can answer (issue 8, item 4; docs/approvals.md).

A real stack (``planrun up``: Prefect server, runner, bridge) runs a plan whose first steps
try to approve its own later gate through the Prefect API: they write the flow-run input
under the predictable key gates used to have and under guesses of the new one. The
operator's policy lets submitted plans reach private addresses here, yet the network guard
still refuses them the Prefect API; so the test also writes the same answers itself while
the plan holds before its gate (what a plan would do if it could reach the API). The gate
must still wait, even when the run's flow body is started again, and only an answer given
through the CLI after the asking runs the step. An answer to an earlier asking (a stale
nonce) does not count either.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from planrun.contract.control import answer_form, approval_key, asking_key, is_asking_of
from planrun.flows.control import answer_of
from tests.helpers import wait_for
from tests.stack import Stack

#: Key suffixes a plan might guess for the gate's nonce.
GUESSES = ("", "-0", "-1", "-" + "0" * 32, "-" + "f" * 32)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("gates")
    policy = home / "policy.yaml"
    policy.write_text("submitted: {allow_private: true}\n")  # the Prefect API is reachable
    running = Stack(home, env={"PLANRUN_POLICY": str(policy)})
    yield running
    if running.process.poll() is None:
        running.stop()


def self_approving_plan() -> str:
    """Steps that write an approval for ``gated`` under every key they can think of."""
    lines = ["version: 1", "name: self-approve", "inputs:", "  api: {type: string}",
             "steps:"]
    for i, suffix in enumerate(GUESSES):
        key = f"suspended-{approval_key('gated')}{suffix}-response"
        lines += [f"  - id: forge{i}", "    tool: http.request", "    critical: false",
                  "    with:", "      method: POST",
                  '      url: "{{ inputs.api }}/flow_runs/{{ run.id }}/input"',
                  f"      json: {{key: {key}, value: '{{\"approved\": true, "
                  f"\"comment\": \"self\"}}'}}"]
    forged = ", ".join(f"forge{i}" for i in range(len(GUESSES)))
    lines += ["  - id: hold", "    tool: shell.run", f"    needs: [{forged}]",
              "    when: true",  # whether or not the tries were refused
              '    with: {argv: [sh, -c, "until [ -e go ]; do sleep 0.05; done"]}',
              "  - id: gated", "    tool: file.write", "    needs: [hold]",
              '    approval: {prompt: "Run gated?"}',
              "    with: {path: gated.txt, content: ran}"]
    return "\n".join(lines) + "\n"


def report(stack: Stack, run_id: str) -> dict[str, Any]:
    return stack.report(run_id)


def flow_run_state(run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return (await client.read_flow_run(UUID(run_id))).state

    return asyncio.run(read())


def asked_key(run_id: str) -> str | None:
    """The pause key of the gate the run is suspended at now, if it is."""
    state = flow_run_state(run_id)
    key = state.state_details.pause_key if state is not None else None
    if state is None or state.type.value != "PAUSED" or not is_asking_of(key, "gated"):
        return None
    return str(key)


def restart_unanswered(run_id: str) -> None:
    """Start the run's flow body again without an answer, as a forged resume would (a
    plan that reaches the Prefect API can set the state): Scheduled, taken by the runner."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    async def schedule() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(UUID(run_id), Scheduled(), force=True)

    asyncio.run(schedule())


def write_input(run_id: str, key: str, value: dict[str, Any]) -> None:
    """Write a flow-run input through the Prefect API; one already there is kept."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    async def write() -> None:
        async with get_client() as client:
            try:
                await client.create_flow_run_input(UUID(run_id), key, json.dumps(value))
            except ObjectAlreadyExists:
                pass  # the plan's own write landed first

    asyncio.run(write())


def forged_keys(run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client

    async def read() -> set[str]:
        async with get_client() as client:
            found = await client.filter_flow_run_input(
                UUID(run_id), f"suspended-{approval_key('gated')}", limit=100,
                exclude_keys=set())
        return {item.key for item in found if item.key.endswith("-response")}

    return asyncio.run(read())


def wait_asked_anew(stack: Stack, run_id: str, before: str) -> str:
    key = wait_for(lambda: (k := asked_key(run_id)) is not None and k != before and k, 90,
                   "the gate to be asked again")
    wait_for(lambda: report(stack, run_id)["status"] == "awaiting_approval", 30,
             "the bridge to show the gate waiting")
    return str(key)


def test_a_plan_cannot_approve_its_own_gate_and_only_a_persons_later_answer_runs_it(
        stack: Stack, tmp_path: Path) -> None:
    plan = tmp_path / "self-approve.yaml"
    plan.write_text(self_approving_plan())
    submitted = stack.cli("submit", str(plan), "--input",
                          f"api={os.environ['PREFECT_API_URL']}")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    workspace = Path(stack.env["PLANRUN_WORKSPACE"])
    gated = workspace / "gated.txt"

    def holding() -> bool:
        step = report(stack, run_id)["steps"].get("hold")  # none before the run starts
        return step is not None and step["status"] == "running"

    wait_for(holding, 90, "the plan to hold before its gate")
    forged = {f"suspended-{approval_key('gated')}{s}-response" for s in GUESSES}
    for key in forged:  # before the gate is asked: what the plan tried to write
        write_input(run_id, key, {"approved": True, "comment": "self"})
    assert forged <= forged_keys(run_id)
    (workspace / "go").touch()

    first = wait_for(lambda: asked_key(run_id), 90, "the gate to be asked")
    seen = wait_for(lambda: (r := report(stack, run_id))["status"] == "awaiting_approval"
                    and r, 30, "the bridge to show the gate waiting")
    assert seen["awaiting_approval"]["step_id"] == "gated"
    for i in range(len(GUESSES)):  # the plan's own tries: refused, or landed and ignored
        forge = seen["steps"][f"forge{i}"]
        assert forge["status"] == "completed" or "blocked by policy" in forge["error"][
            "message"], forge
    assert not gated.exists()

    # Its flow body started again (a forged resume): the forged answers still do not count.
    restart_unanswered(run_id)
    second = wait_asked_anew(stack, run_id, first)
    assert not gated.exists()

    # An answer to the first asking, given after it was replaced: stale, ignored.
    write_input(run_id, f"suspended-{first}-response", {"approved": True, "comment": "old"})
    restart_unanswered(run_id)
    third = wait_asked_anew(stack, run_id, second)
    assert len({first, second, third}) == 3
    assert not gated.exists()

    approved = stack.cli("approve", run_id, "gated", "--comment", "a person said yes")
    assert approved.returncode == 0, approved.stderr
    final = wait_for(lambda: (r := report(stack, run_id))["status"] in (
        "completed", "completed_with_errors") and r, 90, "the approved run to end")  # with
    # errors when the network guard refused the plan's tries
    assert final["steps"]["gated"]["status"] == "completed"
    assert gated.read_text() == "ran"


# -- which answer counts (the rule alone, on the inputs as Prefect returns them) ----------

BASE = f"suspended-{asking_key('gated', 'a' * 32)}"


def form_and_answer(answered_after_s: float, value: str = '{"decision": "approve"}') -> list[Any]:
    """The form an asking wrote and an answer ``answered_after_s`` later (or earlier)."""
    from prefect.client.schemas.objects import FlowRunInput

    asked = datetime(2025, 1, 1, tzinfo=UTC)
    run = UUID(int=1)
    return [FlowRunInput.model_validate({"flow_run_id": run, "key": f"{BASE}-schema",
                                         "value": "{}", "created": asked}),
            FlowRunInput.model_validate({"flow_run_id": run, "key": f"{BASE}-response",
                                         "value": value, "created": asked + timedelta(
                                             seconds=answered_after_s)})]


def test_an_answer_written_after_the_asking_counts() -> None:
    assert answer_of(form_and_answer(1.0), BASE) == (True, "")


def test_an_answer_written_before_the_gate_was_asked_is_ignored() -> None:
    assert answer_of(form_and_answer(-1.0), BASE) is None


def test_an_answer_without_the_askings_form_is_ignored() -> None:
    assert answer_of(form_and_answer(1.0)[1:], BASE) is None


def test_an_answer_that_is_not_an_approval_is_ignored() -> None:
    assert answer_of(form_and_answer(1.0, '"yes"'), BASE) is None
    assert answer_of(form_and_answer(1.0, '{"approved": "yes"}'), BASE) is None
    assert answer_of(form_and_answer(1.0, '{"decision": "yes"}'), BASE) is None
    assert answer_of(form_and_answer(1.0, '{"decision": true}'), BASE) is None
    assert answer_of(form_and_answer(1.0, '{}'), BASE) is None


def test_the_forms_decision_is_the_answer_and_the_earlier_approved_field_still_counts() -> None:
    rejected = '{"decision": "reject", "comment": "not now"}'
    assert answer_of(form_and_answer(1.0, rejected), BASE) == (False, "not now")
    # the answer of a gate asked by a planrun from before the decision field
    assert answer_of(form_and_answer(1.0, '{"approved": false}'), BASE) == (False, "")
    assert answer_of(form_and_answer(1.0, json.dumps(answer_form(True, "ok"))), BASE) == (
        True, "ok")  # what the bridge and the CLI send


def test_only_keys_with_a_nonce_are_askings_of_the_gate() -> None:
    assert is_asking_of(asking_key("gated", "0123456789abcdef" * 2), "gated")
    assert not is_asking_of(approval_key("gated"), "gated")  # the old predictable key
    assert not is_asking_of(asking_key("gated", "0"), "gated")
    assert not is_asking_of(asking_key("other", "0123456789abcdef" * 2), "gated")
