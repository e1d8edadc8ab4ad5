"""planrun.secrets: where secrets come from, how validation treats them, and how secret
inputs travel by reference (docs/secrets.md). Against the test session's Prefect server."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from typing import Any

import pytest

from planrun import secrets
from planrun.errors import PlanInvalid, UsageError
from planrun.validate import validate_text
from tests.helpers import plan_data, run_yaml

SECRET_INPUT_PLAN = """
    version: 1
    name: secret-input
    inputs: {token: {type: string, secret: true, minLength: 3}}
    steps:
      - {id: a, tool: core.echo, with: {value: "t={{ inputs.token }}"}}
"""


def problems(text: str) -> str:
    with pytest.raises(PlanInvalid) as caught:
        validate_text(textwrap.dedent(text), "t.yaml")
    return "\n".join(str(p) for p in caught.value.problems)


def echo_plan(template: str, inputs: str = "{}") -> str:
    return f"""
        version: 1
        name: s
        inputs: {inputs}
        steps:
          - {{id: a, tool: core.echo, with: {{value: "{template}"}}}}
    """


def test_validation_accepts_secrets_by_name_without_looking_them_up() -> None:
    validate_text(textwrap.dedent(echo_plan("{{ secrets.not_set_anywhere }}")), "t.yaml")


def test_validation_refuses_a_computed_secret_name_and_other_runs_inputs() -> None:
    assert "name each secret a template reads, as secrets.NAME" in problems(
        echo_plan("{{ secrets[run.id] }}"))
    assert "inputs of other runs" in problems(echo_plan("{{ secrets.planrun_input_ab }}"))


def test_a_secret_input_cannot_have_a_default_and_secret_is_a_boolean() -> None:
    assert "cannot have a default" in problems(
        echo_plan("x", "{t: {type: string, secret: true, default: hunter2}}"))
    assert "secret" in problems(echo_plan("x", "{t: {type: string, secret: 'yes'}}"))


def test_a_secret_input_reaches_the_tool_but_the_report_and_parameters_hold_no_value() -> None:
    report = run_yaml(SECRET_INPUT_PLAN, {"token": "hunter2-local"})
    assert report["steps"]["a"]["output"] == {"value": "t=***"}
    parameters = flow_run_parameters(report["run_id"])
    ref = parameters["inputs"]["token"]
    assert list(ref) == ["$secret"] and ref["$secret"].startswith("local:")


def test_a_bad_secret_input_is_refused_without_showing_its_value() -> None:
    from planrun.inputs import resolve_inputs

    plan = validate_text(textwrap.dedent(SECRET_INPUT_PLAN), "t.yaml").plan
    with pytest.raises(UsageError) as caught:
        resolve_inputs(plan, {"token": "hu"}, from_text=True)
    assert "hu" not in str(caught.value).replace("input", "")
    assert "minLength" in str(caught.value)


def test_secrets_by_name_come_from_a_block_before_the_prefixed_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"t{uuid.uuid4().hex[:8]}_key"
    monkeypatch.setenv(secrets.env_name(name), "from-env-value")
    assert run_echo(f"{{{{ secrets.{name} }}}}", {"from-env-value"}) == "***"
    save_block(secrets.block_name(name), "from-block-value")
    try:
        report = run_yaml(echo_plan(f"{{{{ secrets.{name} }}}} {{{{ secrets.{name} | length }}}}"))
        assert report["steps"]["a"]["output"]["value"] == "*** 16"  # the block's value
    finally:
        asyncio.run(secrets.forget([secrets.block_name(name)]))


def test_only_prefixed_environment_variables_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNPREFIXED_TOKEN", "should-not-be-read")
    report = run_yaml(echo_plan("{{ secrets.unprefixed_token }}"))
    step = report["steps"]["a"]
    assert step["status"] == "failed"
    assert step["error"]["category"] == "configuration"
    assert "PLANRUN_SECRET_UNPREFIXED_TOKEN" in step["error"]["message"]
    assert "should-not-be-read" not in str(report)


def test_a_secret_input_stored_by_reference_is_resolved_then_forgotten() -> None:
    specs = {"token": {"type": "string", "secret": True}, "n": {"type": "integer"}}
    params, blocks = asyncio.run(secrets.stored_inputs(specs, {"token": "block-held", "n": 2}))
    assert params["n"] == 2 and params["token"] == {"$secret": blocks[0]}
    assert secrets.input_blocks(params) == blocks
    plan = validate_text(textwrap.dedent(SECRET_INPUT_PLAN), "t.yaml").plan
    inputs, found = asyncio.run(secrets.load(plan, {"token": params["token"]}))
    assert inputs["token"] == "block-held" and found.redactor.text("block-held") == "***"
    asyncio.run(secrets.forget(blocks))
    with pytest.raises(UsageError, match="no longer stored"):
        asyncio.run(secrets.load(plan, {"token": params["token"]}))


@pytest.mark.parametrize("given", [{"$secret": "aws-credentials"},
                                   {"$secret": "local:" + "0" * 32}])
def test_a_reference_to_anything_else_is_refused(given: dict[str, str]) -> None:
    plan = validate_text(textwrap.dedent(SECRET_INPUT_PLAN), "t.yaml").plan
    with pytest.raises(UsageError, match="secret input 'token'"):
        asyncio.run(secrets.load(plan, {"token": given}))


def test_a_reference_for_an_input_not_declared_secret_is_refused() -> None:
    plan = validate_text(textwrap.dedent(echo_plan("x", "{t: {type: string}}")), "t.yaml").plan
    with pytest.raises(UsageError, match="not declared secret"):
        asyncio.run(secrets.load(plan, {"t": {"$secret": "local:" + "0" * 32}}))


def run_echo(template: str, hidden: set[str]) -> Any:
    report = run_yaml(echo_plan(template))
    assert not any(value in str(report) for value in hidden)
    return report["steps"]["a"]["output"]["value"]


def save_block(name: str, value: str) -> None:
    from prefect.blocks.system import Secret

    async def save() -> None:
        block: Any = Secret(value=value)  # type: ignore[arg-type]
        await block.asave(name, overwrite=True)

    asyncio.run(save())


def flow_run_parameters(run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    async def read() -> dict[str, Any]:
        async with get_client() as client:
            return dict((await client.read_flow_run(uuid.UUID(run_id))).parameters)

    return asyncio.run(read())


def test_plan_data_keeps_the_secret_flag() -> None:
    assert plan_data(SECRET_INPUT_PLAN)["inputs"]["token"]["secret"] is True
