"""The passes of validation that follow references (docs/plan-format.md): ``needs`` and
their cycles, what templates name (steps upstream, inputs, secrets), and the inputs'
own definitions. ``planrun.validate`` runs them after the schema and the tools."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError as BadSchema

from planrun import secrets, templates
from planrun.errors import Problem
from planrun.loader import Path_, Source

# -- needs and cycles -------------------------------------------------------------------

def _needs_of(step: dict[str, Any]) -> list[str]:
    needs = step.get("needs", [])
    return [n for n in needs if isinstance(n, str)] if isinstance(needs, list) else []


def needs_problems(source: Source, steps: list[tuple[int, dict[str, Any]]]) -> Iterator[Problem]:
    index = _first_index(steps)
    for i, step in steps:
        for j, need in enumerate(_needs_of(step)):
            if need == step.get("id"):
                yield source.problem(("steps", i, "needs", j), f"step '{need}' needs itself")
            elif need not in index:
                guess = difflib.get_close_matches(need, list(index), n=1)
                tip = f"; did you mean '{guess[0]}'?" if guess else ""
                yield source.problem(("steps", i, "needs", j), f"unknown step '{need}'{tip}")
    by_index = dict(steps)
    graph = {sid: [n for n in _needs_of(by_index[i]) if n in index and n != sid]
             for sid, i in index.items()}
    for cycle in find_cycles(graph):
        yield source.problem(("steps", index[cycle[0]], "needs"),
                             f"cycle in needs: {' -> '.join([*cycle, cycle[0]])}")


def _first_index(steps: list[tuple[int, dict[str, Any]]]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, step in steps:
        if isinstance(step.get("id"), str):
            index.setdefault(step["id"], i)
    return index


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Each cycle of ``graph`` (node → nodes it needs) once, by iterative depth-first search."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []
    for root in graph:
        if state.get(root):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                cycles.append(path[path.index(child):])
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(graph[child])))
    return cycles


# -- templates --------------------------------------------------------------------------

def template_problems(source: Source,
                       steps: list[tuple[int, dict[str, Any]]]) -> Iterator[Problem]:
    data = source.data if isinstance(source.data, dict) else {}
    inputs: dict[str, Any] = data["inputs"] if isinstance(data.get("inputs"), dict) else {}
    by_index = dict(steps)
    ids = {sid: by_index[i] for sid, i in _first_index(steps).items()}
    bit, before = _ancestor_bits(ids)
    total = 0  # characters of template text: parsing them is what checking costs
    for i, step in steps:
        upstream = _Upstream(_union(_needs_of(step), bit, before), bit)
        for path, text in _step_templates(i, step):
            total += len(text)
            if total > templates.MAX_PLAN_TEMPLATES:
                yield source.problem(path, f"the plan's templates hold over "
                                           f"{templates.MAX_PLAN_TEMPLATES:,} characters in all; "
                                           "make them shorter, or split the plan")
                return
            try:
                refs, unknown = templates.references(text)
            except templates.TemplateError as exc:
                yield source.problem(path, str(exc))
                continue
            for name in sorted(unknown):
                yield source.problem(path, f"unknown name '{name}' in template; "
                                           "templates can use inputs, steps, run and secrets")
            for ref in refs:
                message = _reference_problem(ref, inputs, ids, upstream, step.get("id"))
                if message:
                    yield source.problem(path, message)


def _step_templates(i: int, step: dict[str, Any]) -> Iterator[tuple[Path_, str]]:
    for sub, text in templates.strings(step.get("with")):
        yield ("steps", i, "with", *sub), text
    when = step.get("when")
    if isinstance(when, str):
        yield ("steps", i, "when"), templates.condition(when)
    fallback = step.get("fallback")
    if isinstance(fallback, dict):
        for sub, text in templates.strings(fallback.get("with")):
            yield ("steps", i, "fallback", "with", *sub), text


class _Upstream:
    """The steps a step runs after (its needs, their needs...), as a bit set over ids."""

    def __init__(self, bits: int, bit: dict[str, int]) -> None:
        self.bits, self.bit = bits, bit

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, str) and bool(self.bits & self.bit.get(sid, 0))


def _ancestor_bits(ids: dict[str, dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Each step id's bit, and for each id the bits of every step it runs after.

    One depth-first pass; integers as bit sets keep a chain of thousands of steps fast
    (one OR per need, not a set per step). Inside a cycle (reported elsewhere) the sets
    may be incomplete.
    """
    bit = {sid: 1 << k for k, sid in enumerate(ids)}
    before: dict[str, int] = {}
    for root in ids:
        if root in before:
            continue
        stack = [(root, iter(_needs_of(ids[root])))]
        active = {root}
        while stack:
            sid, needs = stack[-1]
            need = next(needs, None)
            if need is None:
                stack.pop()
                active.discard(sid)
                before[sid] = _union(_needs_of(ids[sid]), bit, before)
            elif need in ids and need not in before and need not in active:
                active.add(need)
                stack.append((need, iter(_needs_of(ids[need]))))
    return bit, before


def _union(needs: list[str], bit: dict[str, int], before: dict[str, int]) -> int:
    bits = 0
    for need in needs:
        if need in bit:
            bits |= bit[need] | before.get(need, 0)
    return bits


def _reference_problem(ref: templates.Reference, inputs: dict[str, Any],
                       ids: dict[str, Any], upstream: _Upstream, own: Any) -> str | None:
    if ref.root == "secrets":  # whether it is set is known only where the run executes
        if ref.name == templates.DYNAMIC:
            return "name each secret a template reads, as secrets.NAME"
        return secrets.name_problem(ref.name)
    if ref.root == "inputs":
        if ref.name not in inputs:
            known = ", ".join(inputs) or "none are declared"
            return f"unknown input '{ref.name}' (inputs: {known})"
        return None
    if ref.name == templates.DYNAMIC:
        return ("name each step a template reads, as steps.ID: a computed or whole 'steps' "
                "could read a step that has not finished")
    if ref.name not in ids:
        return f"unknown step '{ref.name}' in template"
    if ref.name == own:
        return f"step '{own}' cannot use its own result"
    if ref.name not in upstream:
        return (f"uses steps.{ref.name} but '{ref.name}' is not in this step's needs "
                "(directly or through other steps); add it to needs")
    if ref.field is not None and ref.field not in templates.STEP_FIELDS:
        return (f"steps.{ref.name}.{ref.field} does not exist; a step has "
                f"{', '.join(templates.STEP_FIELDS)}")
    return None


# -- inputs -----------------------------------------------------------------------------

def input_problems(source: Source) -> Iterator[Problem]:
    data = source.data if isinstance(source.data, dict) else {}
    inputs = data.get("inputs")
    if not isinstance(inputs, dict):
        return
    for name, spec in inputs.items():
        if not isinstance(spec, dict):
            continue
        message = _input_definition_problem(spec)
        if message:
            yield source.problem(("inputs", name), f"not a valid input definition: {message}")
        elif "default" in spec:
            for err in Draft202012Validator(spec, registry=_NO_RETRIEVAL).iter_errors(
                    spec["default"]):
                yield source.problem(("inputs", name, "default"),
                                     f"default does not fit the input's definition: {err.message}")


#: Input definitions come from an untrusted plan: a ``$ref`` must never fetch a URL.
_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()


def _input_definition_problem(spec: dict[str, Any]) -> str | None:
    secret = secrets.definition_problem(spec)
    if secret is not None:
        return secret
    if _has_key(spec, ("pattern", "patternProperties")):
        return ("'pattern' is not allowed in input definitions (a planner's regular expression "
                "could make validation hang); use enum, minLength or maxLength")
    outside = next(_outside_refs(spec), None)
    if outside is not None:
        return f"$ref {outside!r} points outside the definition; only '#...' refs are allowed"
    try:
        Draft202012Validator.check_schema(spec)
        # Resolves the local refs the default would need, without retrieving anything.
        list(Draft202012Validator(spec, registry=_NO_RETRIEVAL).iter_errors(spec.get("default")))
    except BadSchema as exc:
        return exc.message
    except referencing.exceptions.Unresolvable as exc:
        return f"cannot resolve {exc}"
    except RecursionError:  # {"$ref": "#"}: each check of a value leads back to itself
        return ("its $ref leads back to itself without ever checking a value; a $ref may "
                "only recurse inside properties or items")
    return None


def _has_key(value: Any, keys: tuple[str, ...]) -> bool:
    if isinstance(value, dict):
        return any(k in keys or _has_key(v, keys) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_key(v, keys) for v in value)
    return False


def _outside_refs(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("$ref", "$dynamicRef") and not str(item).startswith("#"):
                yield item
            yield from _outside_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _outside_refs(item)
