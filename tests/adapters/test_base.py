"""The adapter interface's edge: what escapes ``execute`` becomes the StepError a run
retries or fails on, and the policy's output ceiling is kept."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.errors import AccessError, ConfigurationError, ResourceError, TransientError
from planrun.policy import Ceilings, Policy


class RaiseParams(Params):
    raise_: str = ""
    size: int = 0


class Raiser(Adapter[RaiseParams]):
    """A tool that raises what it is told to, or returns ``size`` characters."""

    name: ClassVar[str] = "test.raiser"
    Params = RaiseParams

    async def execute(self, params: RaiseParams, ctx: StepContext) -> Any:
        errors: dict[str, Exception] = {
            "permission": PermissionError("[Errno 13] Permission denied: '/root'"),
            "refused": ConnectionRefusedError("[Errno 111] Connection refused"),
            "timeout": TimeoutError("the library's own timeout"),
            "bug": KeyError("surprise"),
        }
        if params.raise_ == "hang":
            await asyncio.Event().wait()
        if params.raise_:
            raise errors[params.raise_]
        return {"text": "x" * params.size}


def _run(raw: dict[str, Any], ctx: StepContext, timeout: float | None = 5) -> Any:
    return asyncio.run(Raiser().run(raw, ctx, timeout))


def test_a_permission_error_becomes_an_access_error(ctx: StepContext) -> None:
    with pytest.raises(AccessError, match="Permission denied: '/root'"):
        _run({"raise_": "permission"}, ctx)


@pytest.mark.parametrize(("kind", "message"), [
    ("refused", "ConnectionRefusedError: [Errno 111] Connection refused"),
    ("timeout", "TimeoutError: the library's own timeout"),
])
def test_connection_errors_and_a_librarys_own_timeout_are_transient(
        ctx: StepContext, kind: str, message: str) -> None:
    with pytest.raises(TransientError) as caught:
        _run({"raise_": kind}, ctx)
    assert caught.value.message == message


def test_an_unexpected_exception_is_retried_and_asks_to_be_reported(ctx: StepContext) -> None:
    with pytest.raises(TransientError) as caught:
        _run({"raise_": "bug"}, ctx)
    assert caught.value.message == "test.raiser failed unexpectedly: KeyError: 'surprise'"
    assert "report it if it persists" in caught.value.hint


def test_a_step_past_its_timeout_is_stopped_with_a_hint(ctx: StepContext) -> None:
    with pytest.raises(TransientError, match="test.raiser did not finish within its timeout "
                                             "of 0.05s") as caught:
        _run({"raise_": "hang"}, ctx, timeout=0.05)
    assert "raise its 'timeout:'" in caught.value.hint


def test_output_over_the_policys_ceiling_is_a_resource_error(
        make_ctx: Callable[..., StepContext]) -> None:
    policy = Policy().local.model_copy(update={"ceilings": Ceilings.model_validate({"output_bytes": 100})})
    ctx = make_ctx(policy=policy)
    assert _run({"size": 50}, ctx) == {"text": "x" * 50}
    with pytest.raises(ResourceError, match="test.raiser returned 212 bytes, over the "
                                            "policy's output ceiling of 100 bytes"):
        _run({"size": 200}, ctx)


def test_a_tool_without_its_own_estimate_or_health_uses_the_defaults(ctx: StepContext) -> None:
    tool = Raiser()
    assert tool.estimate(RaiseParams()) == 1.0
    assert asyncio.run(tool.health()).ok


def test_usage_is_reduced_only_after_a_resource_error(
        make_ctx: Callable[..., StepContext]) -> None:
    assert make_ctx(previous_error=ResourceError("too big")).reduce_usage
    assert not make_ctx(previous_error=TransientError("reset")).reduce_usage
    assert not make_ctx().reduce_usage


def test_bad_parameters_name_each_problem_and_point_to_the_schema(ctx: StepContext) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _run({"size": "many", "colour": "red"}, ctx)
    assert caught.value.message.startswith("invalid parameters for test.raiser: size: ")
    assert "colour: Extra inputs are not permitted" in caught.value.message
    assert "`planrun tools` shows test.raiser's schema" in caught.value.hint
    schema = Raiser.parameter_schema()
    assert schema["additionalProperties"] is False and set(schema["properties"]) == {
        "raise_", "size"}
