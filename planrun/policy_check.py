"""A plan checked against the operator's policy for its trust level (docs/policy.md).

What a plan states literally is judged here, when it is validated (``planrun validate``,
``run``, ``submit``, ``POST /v1/runs``) and again where it runs (``flows.plan_flow``): the
tools it uses, the programs ``shell.run`` starts, the hosts ``http.request`` and
``browser.open`` reach (an address, ``localhost``, a host outside ``hosts``), and the limits
it asks for against the level's ceilings. A templated value is judged where the step
executes, by the tool. A limit the plan leaves out gets the ceiling there (``tightest``): a
plan can only tighten.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from typing import Any

from planrun import templates
from planrun.adapters.executables import SYSTEM_PATH, allows, resolve_program
from planrun.adapters.netguard import literal_problem
from planrun.durations import parse_duration
from planrun.errors import Problem
from planrun.loader import Path_, Source
from planrun.plan_schemas.model import Limits
from planrun.policy import LevelPolicy, Trust
from planrun.policy_limits import OperatorLimits

DOC = "(docs/policy.md)"
#: Tools whose ``url`` parameter is judged against the level's hosts.
NETWORK_TOOLS = ("http.request", "browser.open")

#: Tool parameters capped by a ceiling: tool → parameter → the ceiling's field.
PARAMETER_CEILINGS: dict[str, dict[str, str]] = {
    "http.request": {"max_bytes": "output_bytes"},
    "shell.run": {"max_output_bytes": "output_bytes", "cpu_seconds": "cpu_seconds"},
}


def policy_problems(source: Source, level: LevelPolicy, trust: Trust,
                    limits: OperatorLimits | None = None) -> Iterator[Problem]:
    """Every place where the plan in ``source`` asks for more than ``level`` (and the
    operator's ``limits``) allow."""
    data = _mapping(source.data)
    yield from _limit_problems(source, data, level, trust)
    if limits is not None:
        yield from tool_limit_problems(source, _mapping(data.get("limits")), limits)
    steps = data.get("steps")
    for i, step in enumerate(steps if isinstance(steps, list) else []):
        if not isinstance(step, dict):
            continue
        yield from _over(source, ("steps", i, "memory_mb"), step.get("memory_mb"),
                         level.ceilings.memory_mb, trust, "memory_mb", "memory_mb")
        for base, call in _calls(i, step):
            yield from _call_problems(source, base, call, level, trust)


def _calls(i: int, step: dict[str, Any]) -> Iterator[tuple[Path_, dict[str, Any]]]:
    yield ("steps", i), step
    if isinstance(step.get("fallback"), dict):
        yield ("steps", i, "fallback"), step["fallback"]


def _call_problems(source: Source, base: Path_, call: dict[str, Any], level: LevelPolicy,
                   trust: Trust) -> Iterator[Problem]:
    tool = call.get("tool")
    if not isinstance(tool, str):
        return
    if not tool_allowed(tool, level):
        yield source.problem((*base, "tool"), f"tool '{tool}' is not allowed: the '{trust}' "
                             f"policy allows only {', '.join(level.tools or [])} {DOC}")
        return
    params = _mapping(call.get("with"))
    where: Path_ = (*base, "with")
    if tool == "shell.run":
        argv = params.get("argv")
        program = _literal(argv[0] if isinstance(argv, list) and argv else None)
        message = program and executable_problem(program, level, trust)
        if message:
            yield source.problem((*where, "argv", 0), f"{message} {DOC}")
    if tool in NETWORK_TOOLS:
        url = _literal(params.get("url"))
        message = url and literal_problem(url, level, trust)
        if message:
            yield source.problem((*where, "url"), f"{tool} is {message} {DOC}")
    if "timeout" in call:
        yield from _timeout_problems(source, (*base, "timeout"), call["timeout"], level, trust)
    for name, ceiling in PARAMETER_CEILINGS.get(tool, {}).items():
        yield from _over(source, (*where, name), params.get(name), _ceiling(level, ceiling),
                         trust, f"{tool}'s {name}", ceiling)


def _literal(value: Any) -> str | None:
    """``value`` when it is a string without templates (known before the run), else None."""
    return value if isinstance(value, str) and not templates.has_template(value) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _limit_problems(source: Source, data: dict[str, Any], level: LevelPolicy,
                    trust: Trust) -> Iterator[Problem]:
    limits, defaults = _mapping(data.get("limits")), _mapping(data.get("defaults"))
    ceilings = level.ceilings
    parallel = limits.get("max_parallel")
    if parallel != Limits.model_fields["max_parallel"].default:
        # Plan data dumped with its defaults (``planrun run``) did not ask for the default:
        # where the run executes, the ceiling lowers it.
        yield from _over(source, ("limits", "max_parallel"), parallel,
                         ceilings.max_parallel, trust, "max_parallel", "max_parallel")
    yield from _over(source, ("limits", "memory_mb"), limits.get("memory_mb"),
                     ceilings.memory_mb, trust, "memory_mb", "memory_mb")
    if "timeout" in defaults:
        yield from _timeout_problems(source, ("defaults", "timeout"), defaults["timeout"],
                                     level, trust)


def tool_limit_problems(source: Source, asked: dict[str, Any],
                        limits: OperatorLimits) -> Iterator[Problem]:
    """Where the plan's ``limits.tools`` loosen the operator's limits of a tool (a plan
    may only tighten them: docs/limits.md)."""
    for tool, wanted in _mapping(asked.get("tools")).items():
        allowed = limits.tool(str(tool))
        own = str(tool) in limits.tools
        for name in ("concurrency", "rate", "burst"):
            value, ceiling = _mapping(wanted).get(name), getattr(allowed, name)
            if name == "burst" and allowed.rate is None:
                continue  # a burst without the operator's rate limits nothing
            if ceiling is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value > ceiling:
                origin = "" if own else " (the default)"
                yield source.problem(
                    ("limits", "tools", tool, name),
                    f"{tool}'s {name} {value:g} is above the policy's limit "
                    f"limits.tools.{tool}.{name} of {ceiling:g}{origin}: a plan may only "
                    "tighten it (docs/limits.md)")


def _timeout_problems(source: Source, path: Path_, value: Any, level: LevelPolicy,
                      trust: Trust) -> Iterator[Problem]:
    ceiling = level.ceilings.step_timeout_s
    if ceiling is None or value is None:
        return
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError):
        return  # not a duration: the schema pass reports it
    if seconds is not None and seconds > ceiling:
        yield source.problem(path, f"a timeout of {seconds:g}s is above the '{trust}' "
                             f"policy's ceiling step_timeout_s of {ceiling:g}s {DOC}")


def _over(source: Source, path: Path_, value: Any, ceiling: float | None, trust: Trust,
          what: str, rule: str) -> Iterator[Problem]:
    if ceiling is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if value > ceiling:
        yield source.problem(path, f"{what} {value:g} is above the '{trust}' policy's "
                             f"ceiling {rule} of {ceiling:g} {DOC}")


def _ceiling(level: LevelPolicy, name: str) -> float | None:
    value = getattr(level.ceilings, name, None)
    return value if isinstance(value, int | float) else None


# -- rules shared with the tools -------------------------------------------------------------

def tool_allowed(tool: str, level: LevelPolicy) -> bool:
    """Whether ``level`` lets plans use ``tool``."""
    return level.tools is None or any(fnmatch.fnmatchcase(tool, p) for p in level.tools)


def executable_problem(program: str, level: LevelPolicy, trust: Trust) -> str | None:
    """Why ``shell.run`` may not start ``program`` (its literal ``argv[0]``) under
    ``level``, or None; judged as ``adapters.executables`` judges it where the step runs
    (a name on the system PATH, a path resolved and normalised). A program that cannot be
    resolved here (a path relative to the step's directory) is left to the run."""
    allowed = level.executables
    if allowed is None:
        return None
    if "/" in program and not program.startswith("/"):
        return None
    try:
        resolved = resolve_program(program, "/", os.pathsep.join(SYSTEM_PATH))
    except OSError:
        if "/" not in program:
            return None
        resolved = os.path.normpath(program)
    if any(allows(rule, resolved) for rule in allowed):
        return None
    return (f"shell.run may not start {program!r}: the '{trust}' policy's executables are "
            f"{', '.join(allowed) or 'none'}")


def tightest(asked: float | None, ceiling: float | None) -> float | None:
    """The limit in force: the plan's, lowered to the ceiling; the ceiling when the plan
    sets none."""
    if asked is None:
        return ceiling
    return asked if ceiling is None else min(asked, ceiling)
