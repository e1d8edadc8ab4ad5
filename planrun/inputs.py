"""Run inputs: ``--input k=v`` strings typed by the plan's ``inputs`` definitions.

The value of an input declared ``secret: true`` never appears in an error
(docs/secrets.md): the error names the input and the rule it breaks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import referencing
from jsonschema import Draft202012Validator, ValidationError

from planrun.errors import UsageError
from planrun.plan_schemas.model import Plan

#: Input definitions come from an untrusted plan: never fetch a schema they point to.
_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()


def _typed(name: str, text: str, spec: dict[str, Any]) -> Any:
    kind = spec.get("type", "string")
    kinds = kind if isinstance(kind, list) else [kind]
    if "string" in kinds:
        return text
    try:
        if "integer" in kinds and text.strip().lstrip("+-").isdigit():
            return int(text)
        if "number" in kinds:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        if "boolean" in kinds:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError(text)
        return json.loads(text)
    except ValueError:
        shown = "the secret value" if spec.get("secret") is True else repr(text)
        raise UsageError(f"input '{name}': {shown} is not {' or '.join(kinds)}") from None


def _said(err: ValidationError, spec: dict[str, Any]) -> str:
    """The error's message; for a secret, the rule it breaks instead (the message would
    quote the value)."""
    if spec.get("secret") is True:
        return f"the secret value does not fit the input's '{err.validator}' rule"
    return err.message


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}``; a pair without ``=`` is a usage error."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--input {pair!r}: write NAME=VALUE")
        result[name.strip()] = value
    return result


def resolve_inputs(plan: Plan, given: dict[str, Any], *, from_text: bool) -> dict[str, Any]:
    """Every input of ``plan``: given values (typed when ``from_text``) or defaults.

    Unknown names, missing required inputs and values that do not fit their definition
    are usage errors that name the input.
    """
    unknown = sorted(set(given) - set(plan.inputs))
    if unknown:
        known = ", ".join(plan.inputs) or "none"
        raise UsageError(f"unknown input {', '.join(unknown)} (this plan's inputs: {known})")
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, spec in plan.inputs.items():
        if name in given:
            raw = given[name]
            value = _typed(name, raw, spec) if from_text and isinstance(raw, str) else raw
        elif "default" in spec:
            value = spec["default"]
        else:
            problems.append(f"input '{name}' is required: pass --input {name}=VALUE")
            continue
        for err in Draft202012Validator(spec, registry=_NO_RETRIEVAL).iter_errors(value):
            problems.append(f"input '{name}': {_said(err, spec)}")
        values[name] = value
    if problems:
        raise UsageError("; ".join(problems))
    return values
