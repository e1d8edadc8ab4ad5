"""Templates in plans: ``{{ inputs.NAME }}``, ``{{ steps.ID.output... }}``,
``{{ steps.ID.status }}``, ``{{ run.id }}`` and ``{{ secrets.NAME }}`` (docs/secrets.md).

Rendered by Jinja2's sandbox (never ``eval``). A string that is exactly one ``{{ ... }}``
keeps the type of its value (a list stays a list); any other string renders to text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: What a template may read of a step: ``steps.ID.<field>``.
STEP_FIELDS = ("output", "status", "error", "attempts", "reason", "fallback_used")
NAMES = ("inputs", "steps", "run", "secrets")

_WHOLE = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)
#: The most items (characters, list entries) one ``*`` may produce, and the largest
#: exponent of ``**``: a plan's template must not be able to exhaust memory or the CPU.
MAX_REPEAT = 100_000
MAX_EXPONENT = 256
MAX_BITS = 100_000


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with ``*`` and ``**`` bounded in what they produce."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT \
                and not (isinstance(left, (int, float)) and abs(left) <= 1):
            raise TemplateError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left).bit_length() * abs(right) > MAX_BITS:
            raise TemplateError(f"the power {left}**{right} is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_REPEAT:
                    raise TemplateError(f"repeating {len(seq)} items {times} times is too "
                                        f"much (at most {MAX_REPEAT} items)")
        return super().call_binop(context, operator, left, right)


_ENV = _BoundedSandbox(undefined=StrictUndefined, autoescape=False)


class TemplateError(Exception):
    """A template could not be parsed or rendered; the message says why."""


def has_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def condition(when: str) -> str:
    """A ``when`` as a template: ``steps.a.status == 'failed'`` means ``{{ ... }}``."""
    return when if has_template(when) else "{{ " + when + " }}"


#: The name of a reference to ``steps`` that is not a fixed ``steps.ID``.
DYNAMIC = "*"


@dataclass(frozen=True)
class Reference:
    """One ``steps.ID[.field]`` or ``inputs.NAME`` a template reads."""

    root: str
    name: str
    field: str | None = None


@lru_cache(maxsize=4096)
def _parse(text: str) -> nodes.Template:
    try:
        return _ENV.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def references(text: str) -> tuple[list[Reference], set[str]]:
    """The steps and inputs ``text`` reads, and any unknown top-level names."""
    try:
        return _references(text)
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def _references(text: str) -> tuple[list[Reference], set[str]]:
    tree = _parse(text)
    unknown = _undeclared(tree, text) - set(NAMES)
    found: list[Reference] = []
    named: set[int] = set()  # the ``steps`` Name nodes that are looked up by a fixed name
    lookup: Any
    for lookup in tree.find_all((nodes.Getattr, nodes.Getitem)):
        base = lookup.node
        if not (isinstance(base, nodes.Name) and base.name in ("inputs", "steps", "secrets")):
            continue
        name = _key(lookup)
        if name is None:
            continue
        named.add(id(base))
        field = None
        if base.name == "steps":
            field = _parent_field(tree, lookup)
        found.append(Reference(base.name, name, field))
    for node in tree.find_all(nodes.Name):
        if node.name in ("steps", "secrets") and node.ctx == "load" and id(node) not in named:
            found.append(Reference(node.name, DYNAMIC))  # steps[expr], for s in steps, ...
    return found, unknown


#: Statements that bind no names: in a template of only these, every name is read from
#: the context, which is much quicker to find than by Jinja's code generator.
_PLAIN_STATEMENTS = (nodes.Output, nodes.If)
_BUILTIN_NAMES = {*_ENV.globals, "self"}
_OTHER_TEMPLATES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


def _undeclared(tree: nodes.Template, text: str) -> set[str]:
    """The names template ``text`` (parsed: ``tree``) reads from the context, as
    ``meta.find_undeclared_variables``, after checking that its filters and tests exist."""
    check: Any
    for check in tree.find_all((nodes.Filter, nodes.Test)):
        kind, known = ("filter", _ENV.filters) if isinstance(check, nodes.Filter) else (
            "test", _ENV.tests)
        if check.name not in known:
            raise TemplateError(f"template error: no {kind} named '{check.name}'")
    if any(True for _ in tree.find_all(_OTHER_TEMPLATES)):
        raise TemplateError("template error: a plan's templates cannot extend, include or "
                            "import other templates")
    if all(isinstance(node, _PLAIN_STATEMENTS) for node in tree.find_all(nodes.Stmt)):
        loaded = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
        return loaded - _BUILTIN_NAMES
    from jinja2 import meta

    try:
        # On a tree of its own: Jinja's optimizer rewrites the tree it compiles.
        return set(meta.find_undeclared_variables(_ENV.parse(text)))
    except TemplateSyntaxError as exc:  # TemplateAssertionError: a block used wrongly
        raise TemplateError(f"template error: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - Jinja folds constants while it analyses
        raise TemplateError(f"template error: {exc}") from None


def _key(lookup: Any) -> str | None:
    if isinstance(lookup, nodes.Getattr):
        return str(lookup.attr)
    if isinstance(lookup.arg, nodes.Const) and isinstance(lookup.arg.value, str):
        return lookup.arg.value
    return None


def _parent_field(tree: nodes.Template, inner: nodes.Node) -> str | None:
    outer: Any
    for outer in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if outer.node is inner:
            return _key(outer)
    return None


TemplatePath = tuple[str | int, ...]


def strings(value: Any, path: TemplatePath = ()) -> Iterator[tuple[TemplatePath, str]]:
    """Every string inside ``value`` that holds a template, with its path."""
    if isinstance(value, str):
        if has_template(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, (*path, i))


def render(value: Any, context: dict[str, Any]) -> Any:
    """``value`` with every template in it rendered against ``context``."""
    if isinstance(value, str):
        return render_string(value, context) if has_template(value) else value
    if isinstance(value, dict):
        return {key: render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context) for item in value]
    return value


def render_string(text: str, context: dict[str, Any]) -> Any:
    """Render one string; exactly one ``{{ expr }}`` keeps the expression's type."""
    try:
        whole = _WHOLE.match(text)
        if whole:
            result = _expression(whole.group("expr").strip())(**context)
            if isinstance(result, Undefined):
                result._fail_with_undefined_error()
            return result
        return _ENV.from_string(text).render(**context)
    except TemplateError:
        raise
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error in {text!r}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - Jinja raises many kinds; all mean "cannot render"
        raise TemplateError(f"cannot render {text!r}: {exc}") from None


@lru_cache(maxsize=4096)
def _expression(expr: str) -> Any:
    try:
        return _ENV.compile_expression(expr, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def truthy(value: Any) -> bool:
    """How a rendered ``when`` is read: booleans as is, 'false'/'0'/'' and empties false."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "none", "null")
    return bool(value)
