"""Checking a plan, in passes, reporting every problem at once (docs/plan-format.md).

    load (YAML, encoding) → schema (plan.schema.json's rules) → ids and tools →
    tool parameters → needs and cycles → templates → inputs → the operator's policy

Each pass works on whatever the earlier ones could read, so one bad step does not hide
the problems of another. Problems carry file, line, column and the path in the plan.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError
from jsonschema.exceptions import best_match

from planrun import templates
from planrun.adapters.registry import Registry, default_registry
from planrun.adapters.workspace import SAFE_PATH_PATTERN, path_problem
from planrun.durations import parse_duration
from planrun.errors import PlanInvalid, Problem
from planrun.loader import Path_, Source, load, read_plan
from planrun.plan_schemas import model_schema
from planrun.plan_schemas.model import Plan
from planrun.policy import Trust, current_trust, load_policy
from planrun.policy_check import policy_problems
from planrun.validate_refs import input_problems, needs_problems, template_problems

_JSON_TYPES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false", "array": "a list", "object": "a mapping",
               "null": "null"}


@dataclass(frozen=True)
class ValidPlan:
    """A plan that passed every check: the parsed model and where it came from."""

    plan: Plan
    source: Source


def validate_file(path: str | Path, registry: Registry | None = None) -> ValidPlan:
    """Read and check the plan file at ``path``; PlanInvalid lists every problem."""
    raw, problems = read_plan(path)  # no more than the largest plan allowed
    if raw is None:
        raise PlanInvalid(problems)
    return validate_text(raw, str(path), registry)


def validate_text(raw: bytes | str, file: str = "<plan>",
                  registry: Registry | None = None) -> ValidPlan:
    """Check a plan given as YAML text; PlanInvalid lists every problem."""
    source, problems = load(raw, file)
    if source.data is None:
        raise PlanInvalid(_one_line(problems))
    return validate_data(source, registry, problems)


def validate_data(source: Source, registry: Registry | None = None,
                  problems: list[Problem] | None = None, trust: Trust | None = None) -> ValidPlan:
    """Check already-loaded plan data (``source.data``), adding to ``problems``, against
    the policy of ``trust`` (default: the current trust level, ``submitted`` unless a
    caller says otherwise). PolicyInvalid when the policy file cannot be used."""
    registry = registry or default_registry()
    problems = list(problems or [])
    problems += _schema_problems(source)
    steps = _steps(source.data)
    problems += _id_and_tool_problems(source, steps, registry)
    problems += _parameter_problems(source, steps, registry)
    problems += needs_problems(source, steps)
    problems += template_problems(source, steps)
    problems += input_problems(source)
    policy = load_policy()
    problems += policy_problems(source, policy.level(trust or current_trust()),
                                trust or current_trust(), policy.limits)
    if problems:
        raise PlanInvalid(_one_line(list(dict.fromkeys(problems))))
    return ValidPlan(Plan.model_validate(source.data), source)


def _one_line(problems: list[Problem]) -> list[Problem]:
    """Problems whose path and message print on one line, whatever keys a plan holds."""
    return [replace(p, path=_escape(p.path), message=_escape(p.message)) for p in problems]


def _escape(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# -- schema -----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _plan_validator() -> Draft202012Validator:
    return Draft202012Validator(model_schema(Plan))


@lru_cache(maxsize=256)
def _tool_validator(tool: str, registry_id: int, registry: Registry) -> Draft202012Validator:
    return Draft202012Validator(registry.get(tool).parameter_schema())


def _schema_problems(source: Source) -> list[Problem]:
    return [_describe(source, (), err) for err in _plan_validator().iter_errors(source.data)]


def _describe(source: Source, base: Path_, err: SchemaError) -> Problem:
    """A schema error in plain words, located at the offending value or key."""
    path: Path_ = (*base, *err.absolute_path)
    validator = err.validator
    value: Any = err.instance
    expected: Any = err.validator_value
    schema: dict[str, Any] = err.schema if isinstance(err.schema, dict) else {}
    field = path[-1] if path else None
    if validator == "additionalProperties" and isinstance(value, dict):
        allowed = list(schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        if extra:
            guess = difflib.get_close_matches(str(extra[0]), allowed, n=1)
            tip = f"; did you mean '{guess[0]}'?" if guess else f"; allowed: {', '.join(allowed)}"
            return source.problem((*path, extra[0]), f"unknown key '{extra[0]}'{tip}", key=True)
    if validator == "required":
        missing = str(err.message).split("'")[1] if "'" in err.message else err.message
        return source.problem(path, f"missing required key '{missing}'")
    if validator == "type":
        return source.problem(path, f"expected {_type_words(expected)}, "
                                    f"got {_show(value)}")
    if validator == "anyOf" and _is_duration(schema):
        try:
            parse_duration(value)
            message = f"{_show(value)} is not a valid duration"
        except ValueError as exc:
            message = str(exc)
        return source.problem(path, message)
    if validator == "pattern" and "propertyNames" in err.schema_path and path == ("inputs",):
        return source.problem((*path, str(value)), f"{_show(value)} is not a valid input name: use "
                              "lowercase letters, digits and _, starting with a letter", key=True)
    if validator == "pattern" and expected == SAFE_PATH_PATTERN:
        why = path_problem(str(value)) or "not a path inside the workspace"
        return source.problem(path, f"{why}: paths are relative to the workspace root, "
                                    "like 'notes/today.md'")
    if validator == "pattern":
        described = schema.get("description")
        if not isinstance(field, str) or field in ("id", "name", "tool") or not described:
            return source.problem(path, _pattern_words(field, value))
        return source.problem(path, f"{_show(value)} is not valid here: {described}")
    if validator == "anyOf" and err.context:  # e.g. Optional[X]: say what was wrong with X
        return _describe_any_of(source, base, path, err)
    if validator == "const" and field == "version":
        return source.problem(path, f"version must be 1, got {_show(value)}")
    if validator == "minItems" and field == "steps":
        return source.problem(path, "a plan needs at least one step")
    if validator == "maxItems":
        return source.problem(path, f"{len(value)} items; at most {expected} allowed")
    if validator == "enum":
        options = ", ".join(str(v) for v in expected)
        return source.problem(path, f"{_show(value)} is not one of: {options}")
    return source.problem(path, err.message)


def _describe_any_of(source: Source, base: Path_, path: Path_, err: SchemaError) -> Problem:
    specific = [e for e in err.context if e.validator != "type" or e.relative_path]
    if specific:
        return _describe(source, base, best_match(specific))
    names = [n for e in err.context for n in _listed(e.validator_value)]
    return source.problem(path, f"expected {_type_words(names)}, got {_show(err.instance)}")


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _is_duration(schema: dict[str, Any]) -> bool:
    return any("pattern" in b and "ms|s|m|h" in b["pattern"] for b in schema.get("anyOf", []))


def _type_words(expected: str | list[str]) -> str:
    names = [expected] if isinstance(expected, str) else expected
    return " or ".join(_JSON_TYPES.get(n, n) for n in names)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pattern_words(field: Any, value: Any) -> str:
    if field == "id" or isinstance(field, int):
        return (f"{_show(value)} is not a valid step id: use lowercase letters, digits and _, "
                "starting with a letter")
    if field == "name":
        return (f"{_show(value)} is not a valid plan name: use lowercase letters, digits, "
                "_ and -, starting with a letter or digit")
    if field == "tool":
        return f"{_show(value)} is not a tool name like 'core.echo'"
    return f"{_show(value)} does not have the expected form"


# -- ids, tools, parameters -------------------------------------------------------------

def _steps(data: Any) -> list[tuple[int, dict[str, Any]]]:
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list):
        return []
    return [(i, s) for i, s in enumerate(steps) if isinstance(s, dict)]


def _id_and_tool_problems(source: Source, steps: list[tuple[int, dict[str, Any]]],
                          registry: Registry) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    known = registry.names()
    for i, step in steps:
        sid = step.get("id")
        if isinstance(sid, str):
            if sid in seen:
                yield source.problem(("steps", i, "id"),
                                     f"duplicate step id '{sid}' (also steps[{seen[sid]}])")
            else:
                seen[sid] = i
        for path, tool in _tools(i, step):
            if isinstance(tool, str) and tool not in registry:
                guess = difflib.get_close_matches(tool, known, n=1)
                tip = f"did you mean '{guess[0]}'? " if guess else ""
                yield source.problem(path, f"unknown tool '{tool}'; {tip}known tools: "
                                           f"{', '.join(known)}")


def _tools(i: int, step: dict[str, Any]) -> Iterator[tuple[Path_, Any]]:
    yield ("steps", i, "tool"), step.get("tool")
    fallback = step.get("fallback")
    if isinstance(fallback, dict):
        yield ("steps", i, "fallback", "tool"), fallback.get("tool")


def _parameter_problems(source: Source, steps: list[tuple[int, dict[str, Any]]],
                        registry: Registry) -> Iterator[Problem]:
    for i, step in steps:
        calls: list[tuple[Path_, dict[str, Any]]] = [(("steps", i), step)]
        if isinstance(step.get("fallback"), dict):
            calls.append((("steps", i, "fallback"), step["fallback"]))
        for base, call in calls:
            tool, params = call.get("tool"), call.get("with", {})
            if not (isinstance(tool, str) and tool in registry and isinstance(params, dict)):
                continue
            validator = _tool_validator(tool, id(registry), registry)
            for err in validator.iter_errors(params):
                if _templated(err.instance):
                    continue  # checked after rendering, when its value is known
                yield _describe(source, (*base, "with"), err)


def _templated(value: Any) -> bool:
    return isinstance(value, str) and templates.has_template(value)
