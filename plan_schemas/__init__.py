"""The plan format: pydantic models (``model.py``) and the JSON Schema generated from them
together with every registered adapter's parameter schema (``plan.schema.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planrun.adapters.registry import Registry

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")
SCHEMA_ID = "https://planrun.dev/schemas/plan.schema.json"


def tidy(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """Make a pydantic schema read like a hand-written one.

    Inlines ``$ref``s into ``defs``, drops ``title``s and ``default: null``, and turns
    ``anyOf: [X, {type: null}]`` (pydantic's Optional) into ``X``: in a plan, leaving a
    key out is how to say "none".
    """
    if isinstance(schema, list):
        return [tidy(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema and defs is not None:
        return tidy(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        out[key] = tidy(value, defs) if key not in ("default", "const", "enum") else value
    branches = out.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1 and len(kept) < len(branches):
            del out["anyOf"]
            out = {**kept[0], **out}
    return out


def model_schema(model: Any) -> dict[str, Any]:
    """The tidied JSON Schema of a pydantic model, with every reference inlined."""
    raw = model.model_json_schema(by_alias=True)
    return tidy(raw, raw.get("$defs", {}))


def plan_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The plan JSON Schema (2020-12): the format plus each tool's ``with:`` schema."""
    from planrun.adapters.registry import default_registry
    from planrun.plan_schemas.model import Plan

    registry = registry or default_registry()
    schema = model_schema(Plan)
    tools = {a.name: a.parameter_schema() for a in registry.adapters()}
    step = schema["properties"]["steps"]["items"]
    step["properties"]["tool"]["enum"] = sorted(tools)
    step["allOf"] = [
        {
            "if": {"properties": {"tool": {"const": name}}, "required": ["tool"]},
            "then": {"properties": {"with": allow_templates(tidy(s, s.get("$defs", {})))}},
        }
        for name, s in sorted(tools.items())
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "planrun plan, version 1",
        **schema,
        "$defs": {"template": TEMPLATE_SCHEMA},
    }


#: A string holding a template; the validator checks a templated parameter once rendered.
TEMPLATE_SCHEMA = {
    "type": "string",
    "pattern": r"\{\{|\{%",
    "description": "A template such as {{ inputs.NAME }} or {{ steps.ID.output }}; exactly "
    "one {{ ... }} keeps the type of its value.",
}
_NESTED = ("properties", "patternProperties")
_PLAIN_STRING_KEYS = {"type", "description", "default", "examples"}


def allow_templates(schema: Any) -> Any:
    """``schema`` with a template string accepted in place of any parameter value.

    A plan may write ``seconds: "{{ inputs.delay }}"`` where a number is expected: the
    value is only known once rendered, and ``planrun validate`` skips it the same way.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _NESTED:
        if isinstance(out.get(key), dict):
            out[key] = {name: _or_template(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _or_template(out[key])
    return out


def _or_template(schema: Any) -> Any:
    inner = allow_templates(schema)
    if not isinstance(inner, dict):
        return inner
    plain_string = inner.get("type") == "string" and set(inner) <= _PLAIN_STRING_KEYS
    if plain_string:
        return inner  # any string already passes, template or not
    described = {"description": inner["description"]} if "description" in inner else {}
    return {**described, "anyOf": [{"$ref": "#/$defs/template"}, inner]}


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Write the committed ``plan.schema.json`` from the code."""
    path.write_text(json.dumps(plan_schema(), indent=2, sort_keys=True) + "\n")
