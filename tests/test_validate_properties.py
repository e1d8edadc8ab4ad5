"""Property tests of the validator: whatever a planner (or an attacker) sends,
``validate_text`` returns a ValidPlan or raises PlanInvalid with located problems —
never any other exception, never a problem without a line, path or message.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from jinja2 import TemplateSyntaxError, meta, nodes

from planrun import templates
from planrun.adapters.registry import default_registry
from planrun.errors import PlanInvalid
from planrun.templates import _ENV
from planrun.validate import ValidPlan, validate_text

FILE = "prop.yaml"
VALID_TEXTS = [p.read_text(encoding="utf-8")
               for p in sorted((Path(__file__).parent / "plans" / "valid").glob("*.yaml"))]
VALID_DATA = [yaml.safe_load(text) for text in VALID_TEXTS]
LINE = re.compile(rf"^{re.escape(FILE)}:[1-9]\d*:[1-9]\d*: \S+: .+$")

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(raw: bytes | str, *, record: bool = True) -> ValidPlan | None:
    """Validate ``raw`` and assert the contract of every possible outcome.

    ``record`` counts the outcomes in Hypothesis' statistics (inside a @given test only).
    """
    try:
        valid = validate_text(raw, FILE, default_registry())
    except PlanInvalid as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file == FILE
            assert problem.line >= 1 and problem.column >= 1, problem
            assert problem.path and problem.message.strip(), problem
            assert LINE.match(str(problem)), str(problem)
        assert exc.problems == sorted(exc.problems)
        if record:
            event("invalid")
        return None
    assert isinstance(valid, ValidPlan)
    if record:
        event("valid")
    # What the validator accepts, the runner can send to Prefect as JSON.
    json.dumps(valid.plan.model_dump(mode="json", by_alias=True, exclude_none=True))
    return valid


# -- strategies -----------------------------------------------------------------------------

PLAN_WORDS = ["version", "name", "description", "inputs", "defaults", "limits", "steps", "id",
              "tool", "with", "needs", "when", "critical", "timeout", "retry", "fallback",
              "approval", "estimate", "max_attempts", "backoff", "prompt", "max_parallel",
              "deadline", "value", "seconds", "path", "content", "argv", "url", "method",
              "type", "default", "$ref", "<<"]
TOOL_NAMES = ["core.echo", "core.sleep", "core.fail", "file.write", "file.read", "shell.run",
              "http.request", "core.nope", "x"]

template_texts = st.one_of(
    st.builds("{{{{ {} }}}}".format, st.text(max_size=30)),
    st.builds("{{{{ steps.{}.{} }}}}".format, st.text("abcs_1", max_size=6),
              st.sampled_from(["output", "status", "error", "nope", "output.value"])),
    st.builds("{{{{ inputs.{} }}}}".format, st.text("abcdefgt_", max_size=8)),
    st.builds("{{% {} %}}".format, st.text(max_size=20)),
    st.sampled_from(["{{", "}}", "{{ }}", "{% for %}", "{{ steps }}", "{{ steps['a'].output }}",
                     "{{ ''.__class__.__mro__ }}", "{{ inputs | tojson }}", "{#", "{{ 1/0 }}"]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), template_texts,
    st.sampled_from(["10s", "250ms", "5 min", "-1", "1h", "../../etc/passwd", "/etc/passwd",
                     "core.echo", "a", "search"]),
)
keys = st.one_of(st.sampled_from(PLAN_WORDS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
steps = st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["a", "b", "c", "search"]), st.text(max_size=6)),
     "tool": st.sampled_from(TOOL_NAMES)},
    optional={"with": st.dictionaries(keys, values, max_size=4),
              "needs": st.lists(st.sampled_from(["a", "b", "c", "zz"]) | st.integers(),
                                max_size=3),
              "when": template_texts | st.booleans(), "timeout": scalars, "critical": scalars,
              "retry": values, "fallback": values, "approval": values, "estimate": scalars},
)
plans = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, "1", 2, None]),
     "name": st.sampled_from(["plan", "My Plan", "", "p-1"]),
     "steps": st.lists(steps, max_size=5)},
    optional={"inputs": st.dictionaries(keys, values, max_size=3), "defaults": values,
              "limits": values, "description": scalars, "extra": values},
)


def dump(data: Any, flow: bool | None) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True, sort_keys=False)


# -- arbitrary input ------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=400))
def test_random_bytes(raw: bytes) -> None:
    check(raw)


@FAST
@given(st.text(max_size=400))
def test_random_text(text: str) -> None:
    check(text)


YAML_PIECES = [*"-:{}[]&*!|>'\"#%@`,?. \n\t\\abc01<~", "{{", "}}", "- ", ": ", "&a ", "*a",
               "!!binary ", "!!int ", "---\n", "<<: ", "steps:\n", "  - id: a\n", "tool: core.echo"]


@FAST
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=60))
def test_yaml_punctuation(pieces: list[str]) -> None:
    check("".join(pieces))


@FAST
@given(plans, st.sampled_from([None, True, False]))
def test_random_plan_shaped_documents(data: dict[str, Any], flow: bool | None) -> None:
    check(dump(data, flow))


@FAST
@given(values)
def test_random_documents_of_any_shape(data: Any) -> None:
    check(dump(data, None))


# -- mutations of the valid plans -----------------------------------------------------------

def paths_in(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths_in(item, (*path, i))
    return found


def get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def put(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    get(data, path[:-1])[path[-1]] = value
    return data


def nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated_plans(draw: st.DrawFn) -> Any:
    data = copy.deepcopy(draw(st.sampled_from(VALID_DATA)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths_in(data)))
        step_ids = [s["id"] for s in data["steps"]] if _has_steps(data) else []
        op = draw(st.sampled_from(["delete", "retype", "needs", "rename", "template", "nest",
                                   "add_key"]))
        if op == "delete" and path:
            del get(data, path[:-1])[path[-1]]
        elif op == "retype":
            data = put(data, path, draw(values))
        elif op == "needs" and _has_steps(data):
            step = draw(st.sampled_from(data["steps"]))
            if isinstance(step, dict):
                extra = draw(st.lists(st.sampled_from([*step_ids, "a"]) | st.text(max_size=5),
                                      max_size=3))
                old = step.get("needs")
                step["needs"] = (old if isinstance(old, list) else []) + extra
        elif op == "rename" and _has_steps(data):
            step = draw(st.sampled_from(data["steps"]))
            if isinstance(step, dict):
                step["id"] = draw(st.sampled_from([*step_ids, "a"]) | st.text(max_size=6))
        elif op == "template":
            data = put(data, path, draw(template_texts))
        elif op == "nest":
            data = put(data, path, nest(get(data, path), draw(st.integers(1, 160))))
        elif op == "add_key":
            target = get(data, path)
            if isinstance(target, dict):
                target[draw(keys)] = draw(values)
    return data


def _has_steps(data: Any) -> bool:
    steps = data.get("steps") if isinstance(data, dict) else None
    return isinstance(steps, list) and bool(steps) and all(
        isinstance(s, dict) and "id" in s for s in steps)


@FAST
@given(mutated_plans(), st.sampled_from([None, True, False]))
def test_mutated_valid_plans(data: Any, flow: bool | None) -> None:
    check(dump(data, flow))


@FAST
@given(st.sampled_from(VALID_TEXTS), st.data())
def test_edited_text_of_valid_plans(text: str, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 5))
        insert = data.draw(st.sampled_from(["", " ", "\n", "\t", ":", "-", "{", "}", "[", "]",
                                            "'", '"', "&x", "*x", "#", "{{", "}}", "\x00", "é"]))
        text = text[:at] + insert + text[at + cut:]
    check(text)


def test_unmutated_valid_plans_pass_the_same_check() -> None:
    for data in VALID_DATA:
        for flow in (None, True, False):
            assert check(dump(data, flow), record=False) is not None


# -- the template analysis the validator relies on ------------------------------------------

leaves = st.sampled_from(["inputs", "steps", "run", "x", "loop", "self", "range", "dict",
                          "caller", "varargs", "1", "'a'", "none", "true", "[1, 2]"])
expressions = st.recursive(leaves, lambda inner: st.one_of(
    st.builds("{}.{}".format, inner, st.sampled_from(["a", "output", "status", "items"])),
    st.builds("{}[{}]".format, inner, inner),
    st.builds("({} {} {})".format, inner, st.sampled_from(["==", "+", "and", "~", "in"]), inner),
    st.builds("{} | {}".format, inner,
              st.sampled_from(["length", "default(x)", "join(', ')", "tojson", "nosuch"])),
    st.builds("{} is {}".format, inner, st.sampled_from(["defined", "none", "nosuch"])),
    st.builds("({} if {} else {})".format, inner, inner, inner),
    st.builds("{}({})".format, inner, inner),
), max_leaves=8)
plain_templates = st.one_of(
    st.builds("{{{{ {} }}}}".format, expressions),
    st.builds("{{% if {} %}}{{{{ {} }}}}{{% else %}}b{{% endif %}}".format, expressions,
              expressions),
)


@FAST
@given(plain_templates)
def test_template_names_agree_with_jinjas_own_analysis(text: str) -> None:
    """The validator's quick reading of plain templates finds the names Jinja would; it
    is stricter only about filters and tests that do not exist (Jinja defers those inside
    ``{% if %}`` to render time)."""
    try:
        tree = _ENV.parse(text)
    except TemplateSyntaxError:
        assume(False)
    try:  # on a tree of its own: Jinja's optimizer rewrites the tree it compiles
        expected: set[str] | None = set(meta.find_undeclared_variables(_ENV.parse(text)))
    except TemplateSyntaxError:  # an unknown filter or test
        expected = None
    except Exception:  # Jinja's own analysis folds constants and can fail: nothing to compare
        assume(False)
    try:
        found: set[str] | None = templates._undeclared(tree, text)
    except templates.TemplateError:
        unknown = [n for n in tree.find_all((nodes.Filter, nodes.Test))
                   if n.name not in (_ENV.filters if isinstance(n, nodes.Filter) else _ENV.tests)]
        assert unknown
        return
    assert found == expected
