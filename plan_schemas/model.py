"""The plan format, version 1 (docs/plan-format.md), as pydantic models.

These models are the source of ``plan.schema.json``: the JSON Schema editors use and the
validator checks plans against. A validated plan is parsed into them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from planrun.durations import DURATION_PATTERN

Duration = Annotated[
    str | float,
    Field(
        description="A duration: 250ms, 10s, 5m, 1h, or a number of seconds.",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
            ]
        },
    ),
]

STEP_ID_PATTERN = r"^[a-z][a-z0-9_]*$"
PLAN_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
TOOL_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Retry(_Strict):
    """How often and how patiently a step is retried; the category's policy also applies."""

    max_attempts: int | None = Field(
        default=None, ge=1, le=20,
        description="Attempts in all, the first included; the smaller of this and the "
        "error category's limit wins.",
    )
    backoff: Literal["exponential", "fixed"] | None = Field(
        default=None, description="Delay growth between attempts (default exponential)."
    )
    initial_delay: Duration | None = Field(
        default=None, description="Delay before the 2nd attempt (default 1s).")
    max_delay: Duration | None = Field(
        default=None, description="Upper bound of one delay (default 30s).")
    jitter: float | None = Field(
        default=None, ge=0, le=1,
        description="Random spread of each delay, as a fraction (default 0.2).",
    )


class Approval(_Strict):
    """A human gate before the step runs."""

    prompt: str = Field(min_length=1, description="The question a person answers.")
    timeout: Duration | None = Field(default=None, description="How long to wait for an answer.")


class Fallback(_Strict):
    """Another tool call tried once the step's own attempts are exhausted."""

    tool: str = Field(pattern=TOOL_PATTERN, description="A registered tool.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="Its parameters.")
    timeout: Duration | None = Field(default=None, description="Timeout of the fallback call.")


class ToolLimit(_Strict):
    """This run's own limits of one tool: they can only tighten the operator's
    (docs/limits.md)."""

    concurrency: int | None = Field(default=None, ge=1,
                                    description="Calls of the tool by this run at once.")
    rate: float | None = Field(default=None, gt=0,
                               description="Calls of the tool by this run per second.")
    burst: int | None = Field(default=None, ge=1,
                              description="Calls that may start at once when the rate allows "
                                          "(default 1).")


class Limits(_Strict):
    """Run-wide limits."""

    max_parallel: int = Field(default=16, ge=1, le=1000,
                              description="Steps of this run executing at once (1 = sequential).")
    deadline: Duration | None = Field(default=None, description="Time allowed for the whole run.")
    memory_mb: int | None = Field(default=None, ge=16, description="Memory limit per step process.")
    pause_timeout: Duration | None = Field(
        default=None, description="How long a pause or approval may wait.")
    on_pause_timeout: Literal["cancel", "resume"] = Field(
        default="cancel", description="What a timed-out pause does.")
    tools: dict[Annotated[str, Field(pattern=TOOL_PATTERN)], ToolLimit] = Field(
        default_factory=dict,
        description="Per tool: this run's concurrency and rate limits, at most the "
                    "operator's.",
        json_schema_extra={"propertyNames": {"pattern": TOOL_PATTERN}})


class Defaults(_Strict):
    """Applied to every step unless it overrides them."""

    timeout: Duration | None = Field(default=None, description="Per-attempt timeout.")
    retry: Retry | None = None
    critical: bool | None = None


class Step(_Strict):
    """One tool call."""

    id: str = Field(pattern=STEP_ID_PATTERN, max_length=64, description="Unique step id.")
    name: str | None = Field(default=None, max_length=200, description="Display name.")
    tool: str = Field(pattern=TOOL_PATTERN, description="A registered tool.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with",
                                  description="The tool's parameters; templates allowed.")
    needs: list[Annotated[str, Field(pattern=STEP_ID_PATTERN)]] = Field(
        default_factory=list, description="Ids of the steps this one waits for.")
    when: str | bool | None = Field(
        default=None,
        description="Condition, e.g. \"{{ steps.search.status == 'failed' }}\"; "
        "the step then runs once its needs finished in any state.",
    )
    critical: bool | None = Field(default=None,
                                  description="A failure ends the run (default true).")
    timeout: Duration | None = Field(default=None, description="Per-attempt timeout.")
    retry: Retry | None = None
    fallback: Fallback | None = None
    approval: Approval | None = None
    estimate: Duration | None = Field(default=None, description="Hint for the first time estimate.")
    memory_mb: int | None = Field(
        default=None, ge=16,
        description="Memory limit of this step, over the plan's limits.memory_mb; the "
        "policy's ceiling caps both (docs/resources.md).")
    degrade: Literal["wait", "skip"] | None = Field(
        default=None,
        description="Under machine load: wait until it drops (default), or skip the step.")


#: An input's definition: JSON Schema, plus ``secret`` (docs/secrets.md).
InputDefinition = Annotated[dict[str, Any], Field(json_schema_extra={"properties": {
    "secret": {"type": "boolean", "default": False,
               "description": "A secret: its value is passed by reference, never stored in "
                              "the flow run's parameters, and masked (***) wherever the run "
                              "shows it. A secret input has no default."}}})]


class Plan(_Strict):
    """An agent plan, version 1."""

    version: Literal[1] = Field(description="Plan format version; always 1.")
    name: str = Field(pattern=PLAN_NAME_PATTERN, max_length=100, description="The plan's name.")
    description: str | None = None
    inputs: dict[Annotated[str, Field(pattern=STEP_ID_PATTERN)], InputDefinition] = Field(
        default_factory=dict,
        description="Inputs as JSON-Schema property definitions (type, default, enum...); "
                    "secret: true keeps a value out of everything the run stores or shows.",
        # pydantic states the key pattern only as patternProperties, which lets other keys by
        json_schema_extra={"propertyNames": {"pattern": STEP_ID_PATTERN}},
    )
    defaults: Defaults = Field(default_factory=Defaults)
    limits: Limits = Field(default_factory=Limits)
    steps: list[Step] = Field(min_length=1, max_length=5000, description="The steps.")
