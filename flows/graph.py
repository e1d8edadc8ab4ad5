"""Compile, then run: a checked plan becomes a frozen run graph once.

The engine never reads the plan's text forms again: every duration is in seconds here,
the plan's ``defaults`` are merged into each step, ``needs`` are resolved both ways, each
tool is bound to its adapter, and the operator's ceilings for the run's trust level
(docs/policy.md) are applied, so a plan can only tighten them. This module is the only
caller of ``parse_duration`` after validation (docs/plan-format.md, "Durations").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from planrun.adapters.base import Adapter
from planrun.adapters.registry import Registry
from planrun.durations import parse_duration
from planrun.flows.policy import RetryPolicy
from planrun.plan_schemas.model import Plan, Retry, Step, ToolLimit
from planrun.policy import Ceilings
from planrun.policy_check import tightest
from planrun.report import RunRecord, StepRecord


@dataclass(frozen=True)
class Gate:
    """A step's approval gate: the question, and how long an answer may take (the gate's
    own ``timeout``, else the run's ``pause_timeout``; None waits for ever)."""

    prompt: str
    timeout_s: float | None


@dataclass(frozen=True)
class FallbackCall:
    """The tool call tried once a step's attempts are exhausted; ``timeout_s`` is its own
    timeout, else the step's, under the ceiling either way."""

    tool: str
    adapter: Adapter
    with_: Mapping[str, Any]
    timeout_s: float | None


@dataclass(frozen=True)
class StepNode:
    """One step as the engine runs it. ``step`` is the checked step, for what is rendered
    or evaluated while the run goes (``with``, ``when``)."""

    id: str
    step: Step
    tool: str
    adapter: Adapter
    needs: tuple[str, ...]
    dependents: tuple[str, ...]
    retry: RetryPolicy
    timeout_s: float | None
    estimate_s: float
    critical: bool
    fallback: FallbackCall | None
    approval: Gate | None
    #: The step's memory limit: its own ``memory_mb``, else the plan's, under the ceiling.
    memory_mb: int | None = None


@dataclass(frozen=True)
class RunLimits:
    """The run's limits in force: the plan's, lowered to the operator's ceilings."""

    max_parallel: int
    deadline_s: float | None = None
    pause_timeout_s: float | None = None
    on_pause_timeout: Literal["cancel", "resume"] = "cancel"
    memory_mb: int | None = None
    #: The run's own concurrency and rate limits by tool, under the operator's (which
    #: validation checked: docs/limits.md).
    tools: Mapping[str, ToolLimit] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class RunGraph:
    """A compiled plan: its steps in plan order, keyed by id, and its limits."""

    plan: Plan
    steps: Mapping[str, StepNode]
    limits: RunLimits

    @property
    def name(self) -> str:
        return self.plan.name

    def checked_steps(self) -> list[Step]:
        """The checked steps in plan order (what the scheduler walks)."""
        return [node.step for node in self.steps.values()]

    def new_record(self, run_id: str) -> RunRecord:
        """A run record with every step pending and its first estimate."""
        steps = {node.id: StepRecord(id=node.id, tool=node.tool, name=node.step.name,
                                     needs=list(node.needs), critical=node.critical,
                                     estimate_s=node.estimate_s)
                 for node in self.steps.values()}
        return RunRecord(run_id=run_id, plan=self.name, steps=steps)


def compile_plan(plan: Plan, registry: Registry, ceilings: Ceilings | None = None) -> RunGraph:
    """The run graph of ``plan`` (validated against ``registry``) under ``ceilings``."""
    ceilings = ceilings or Ceilings.model_validate({})
    limits = _limits(plan, ceilings)
    dependents: dict[str, list[str]] = {step.id: [] for step in plan.steps}
    for step in plan.steps:
        for need in step.needs:
            dependents[need].append(step.id)
    nodes = {step.id: _node(plan, step, registry, ceilings, limits, tuple(dependents[step.id]))
             for step in plan.steps}
    return RunGraph(plan=plan, steps=MappingProxyType(nodes), limits=limits)


def retry_policy(*layers: Retry | None) -> RetryPolicy:
    """The defaults of ``RetryPolicy``, overridden field by field by each layer in order
    (the plan's ``defaults.retry``, then the step's ``retry``)."""
    fields: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        if layer.max_attempts is not None:
            fields["max_attempts"] = layer.max_attempts
        if layer.backoff is not None:
            fields["backoff"] = layer.backoff
        if layer.initial_delay is not None:
            fields["initial_delay_s"] = parse_duration(layer.initial_delay)
        if layer.max_delay is not None:
            fields["max_delay_s"] = parse_duration(layer.max_delay)
        if layer.jitter is not None:
            fields["jitter"] = layer.jitter
    return RetryPolicy(**fields)


def _limits(plan: Plan, ceilings: Ceilings) -> RunLimits:
    limits = plan.limits
    parallel = tightest(limits.max_parallel, ceilings.max_parallel)
    memory = tightest(limits.memory_mb, ceilings.memory_mb)
    return RunLimits(max_parallel=int(parallel or 1), deadline_s=_seconds(limits.deadline),
                     pause_timeout_s=_seconds(limits.pause_timeout),
                     on_pause_timeout=limits.on_pause_timeout,
                     memory_mb=int(memory) if memory is not None else None,
                     tools=MappingProxyType(dict(limits.tools)))


def _node(plan: Plan, step: Step, registry: Registry, ceilings: Ceilings, limits: RunLimits,
          dependents: tuple[str, ...]) -> StepNode:
    adapter = registry.get(step.tool)
    timeout = step.timeout if step.timeout is not None else plan.defaults.timeout
    timeout_s = tightest(_seconds(timeout), ceilings.step_timeout_s)
    critical = step.critical if step.critical is not None else plan.defaults.critical
    return StepNode(
        id=step.id, step=step, tool=step.tool, adapter=adapter, needs=tuple(step.needs),
        dependents=dependents, retry=retry_policy(plan.defaults.retry, step.retry),
        timeout_s=timeout_s, estimate_s=_estimate(step, adapter),
        critical=True if critical is None else critical,
        fallback=_fallback(step, registry, ceilings, timeout_s),
        approval=Gate(step.approval.prompt, _seconds(step.approval.timeout)
                      if step.approval.timeout is not None else limits.pause_timeout_s)
        if step.approval is not None else None,
        memory_mb=_memory_mb(step, limits, ceilings),
    )


def _memory_mb(step: Step, limits: RunLimits, ceilings: Ceilings) -> int | None:
    """The step's own limit overrides the plan's (a heavy step may need more than the
    rest); the operator's ceiling caps either."""
    if step.memory_mb is None:
        return limits.memory_mb
    return int(tightest(step.memory_mb, ceilings.memory_mb) or step.memory_mb)


def _fallback(step: Step, registry: Registry, ceilings: Ceilings,
              step_timeout_s: float | None) -> FallbackCall | None:
    fallback = step.fallback
    if fallback is None:
        return None
    own = _seconds(fallback.timeout)
    return FallbackCall(tool=fallback.tool, adapter=registry.get(fallback.tool),
                        with_=MappingProxyType(dict(fallback.with_)),
                        timeout_s=tightest(own, ceilings.step_timeout_s)
                        if own is not None else step_timeout_s)


def _estimate(step: Step, adapter: Adapter) -> float:
    """The step's own hint, else the tool's estimate of its parameters."""
    if step.estimate is not None:
        return parse_duration(step.estimate)
    try:
        return adapter.estimate(adapter.validate(step.with_))
    except Exception:  # noqa: BLE001 - templated parameters: use the tool's default
        return adapter.default_estimate_s


def _seconds(value: str | float | None) -> float | None:
    return parse_duration(value) if value is not None else None
